"""``python -m raylm.cli``: the same as the ``raylm`` command."""

from raylm.cli import main

if __name__ == "__main__":
    main()
