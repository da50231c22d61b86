"""kiln.image"""
