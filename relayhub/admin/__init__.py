"""`relayhubctl`: the administrator's command line (SPEC §8), one module per command group."""
