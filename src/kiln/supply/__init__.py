"""kiln.supply"""
