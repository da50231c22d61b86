"""The kiln command line: a thin client of the layers and the agent API."""
