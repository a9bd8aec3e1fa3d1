"""The one base class of every error a user can cause and fix: bad flags or config values, missing or corrupt
data and checkpoints, a diverged run. Scripts print a QuantError as one `error: ...` line and exit with its
`exit_code` (quant/cli.py, `run_main`); any other exception is a bug and keeps its traceback."""


class QuantError(Exception):
    exit_code = 2


class ConfigError(QuantError, ValueError):
    """A config key, value or flag combination that the table in quant/config.py does not allow."""
