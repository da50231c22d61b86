"""kiln.policy"""
