"""kiln.observe"""
