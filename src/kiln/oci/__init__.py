"""What the image and runtime layers share about OCI runtimes: the id range of a
Kiln home, the hardened runtime config, Docker's seccomp profile, and runc.

Both bake ``run`` steps (``kiln.image``) and instances (``kiln.runtime``) run
through runc from a config built here, so they hold the same line.
"""
