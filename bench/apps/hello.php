<?php
// The benchmark application for PHP-FPM: the same three routes as hello.py, chosen on
// REQUEST_URI. /hello -> "Hello, world\n"; /64k -> 65,536 bytes; /echo -> the body's length.
$uri = $_SERVER['REQUEST_URI'] ?? '';
header('Content-Type: text/plain');
if (strncmp($uri, '/echo', 5) === 0) {
    $body = strlen(file_get_contents('php://input'));
} elseif (strncmp($uri, '/64k', 4) === 0) {
    $body = str_repeat('x', 65536);
} else {
    $body = "Hello, world\n";
}
header('Content-Length: ' . strlen($body));
echo $body;
