"""kiln.spec"""
