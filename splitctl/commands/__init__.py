"""splitctl's commands, one module per command group. Each module has an
add_commands(commands) that declares its commands (splitctl.args.Commands) and,
for each command, the `run` and `show` functions (see splitctl/args.py)."""
