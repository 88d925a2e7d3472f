"""Front ends: the command line, the pytest plugin and suite, the self-checks. They turn user
input into a config (frontends.arguments) and drive the engine."""
