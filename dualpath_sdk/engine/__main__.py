"""`python -m dualpath_sdk.engine`: one engine process, as the cluster's launcher starts it."""

from dualpath_sdk.engine.process import main

if __name__ == "__main__":
    main()
