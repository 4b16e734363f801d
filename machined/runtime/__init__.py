"""What runs inside a machine's unit: the supervisor, the container set-up and
PID 1. Nothing here may import the network code, jinja2 or D-Bus at module
level: the init is forked from this process before anything heavy is loaded.
"""
