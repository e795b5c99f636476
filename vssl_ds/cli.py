"""What every command-line tool shares: help that shows the whole description and every default."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module's docstring as written (not re-wrapped, not cut to its first paragraph) and `(default: …)`
    after every option that has one."""
