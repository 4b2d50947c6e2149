"""``python -m bladdergen`` runs the command-line tool (also the way to launch it under torchrun)."""

from bladdergen.cli import main

if __name__ == "__main__":
    main()
