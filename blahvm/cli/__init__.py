"""The ``blahvm`` command for site admins: one module per command, each with ``add_parser`` and a
``run(args) -> exit code`` set as the parser's default. Heavy imports happen inside ``run``."""
