"""An application that imports what a web framework typically takes from the standard library
(30 modules: email, http, json, decimal, ssl, asyncio, sqlite3...), for bench/memory.py's
--share-stdlib figures. Serves ``ok`` on any path."""

# imported for what they cost, not used
import asyncio, base64, calendar, concurrent.futures, contextvars, csv, datetime, decimal  # noqa: F401, E401
import email.message, email.utils, gzip, hashlib, hmac, html, http.client, http.cookies  # noqa: F401, E401
import json, locale, mimetypes, pathlib, secrets, shutil, sqlite3, ssl, tempfile  # noqa: F401, E401
import textwrap, urllib.request, uuid, xml.etree.ElementTree, zlib  # noqa: F401, E401


def application(environ, start_response):
    body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [body]
