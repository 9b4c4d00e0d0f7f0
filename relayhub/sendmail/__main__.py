"""`python -m relayhub.sendmail`: the same as the relayhub-sendmail console script."""

from relayhub.sendmail.command import main

main()
