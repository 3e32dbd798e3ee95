"""Whole jobs built from the commands' functions (never their argv): `keel recipe identity`."""
