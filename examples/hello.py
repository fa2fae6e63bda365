"""A small WSGI application for `make run` and the tests."""

import os


def application(environ, start_response):
    body = (f"Hello from fcgidaemon worker {os.getpid()}\n"
            f"path: {environ.get('SCRIPT_NAME', '')}{environ.get('PATH_INFO', '')}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
