"""kiln.agent"""
