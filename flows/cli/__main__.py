"""`python -m flows.cli`: the same command line as `towerflow`."""
from flows.cli import main

main()
