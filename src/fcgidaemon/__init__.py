"""fcgidaemon: a preforking FastCGI daemon for WSGI applications."""

__version__ = "0.1.0"
