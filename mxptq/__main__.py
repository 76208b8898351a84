"""`python -m mxptq` == the `mxptq` console script."""

from mxptq.cli import main

if __name__ == "__main__":
    main()
