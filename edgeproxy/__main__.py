"""`python -m edgeproxy`: the same command line as the `edgeproxy` script."""
from edgeproxy.cli import main

if __name__ == "__main__":
    main(prog_name="edgeproxy")
