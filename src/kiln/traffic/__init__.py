"""kiln.traffic"""
