"""Plain flup6 prefork server on a port, as the comparison for our workaround tests.

Usage: python run_flup.py PORT.  Serves testapp:application with flup's own
fcgi_fork.WSGIServer (debug=False, like a production setup would).
"""

import sys

from flup.server.fcgi_fork import WSGIServer

from testapp import application

if __name__ == "__main__":
    port = int(sys.argv[1])
    WSGIServer(application, bindAddress=("127.0.0.1", port), debug=False,
               minSpare=2, maxSpare=2, maxChildren=2).run()
