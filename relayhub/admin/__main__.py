"""`python -m relayhub.admin` runs relayhubctl."""

from relayhub.admin.cli import main

main()
