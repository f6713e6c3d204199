"""The package version, in a module of its own so that modules which record it need not import
the package that imports them."""
__version__ = "0.1.0"
