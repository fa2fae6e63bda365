/*
 * The protocol ceiling: the benchmark app's three routes in C over libfcgi.
 *
 *   hello-fcgi HOST PORT WORKERS
 *
 * Binds HOST:PORT itself, then forks WORKERS processes that each loop on
 * FCGX_Accept_r() on the shared listening socket (a preforking server like the
 * Python ones).  Routes, chosen on REQUEST_URI as in bench/apps/hello.py:
 *   /echo  reads the whole body and answers its length as text
 *   /64k   65,536 bytes
 *   other  "Hello, world\n" (13 bytes)
 * The parent re-forks a worker that dies and stops them all on SIGTERM/SIGINT.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcgiapp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_WORKERS 256
#define BIG_SIZE 65536

static const char HELLO[] = "Hello, world\n";
static char big[BIG_SIZE];
static volatile sig_atomic_t stopping = 0;

static int listen_on(const char *host, int port)
{
    struct sockaddr_in addr;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        return -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0)
        return -1;
    return fd;
}

static void respond(FCGX_Request *req, const char *body, size_t len)
{
    char head[128]; /* libfcgi's own FCGX_FPrintF knows no %zu: format here */
    int n = snprintf(head, sizeof head, "Status: 200 OK\r\nContent-Type: text/plain\r\n"
                                        "Content-Length: %zu\r\n\r\n", len);
    FCGX_PutStr(head, n, req->out);
    FCGX_PutStr(body, (int)len, req->out);
}

static void echo_length(FCGX_Request *req)
{
    char buf[65536];
    char text[32];
    long total = 0;
    int n;
    while ((n = FCGX_GetStr(buf, sizeof buf, req->in)) > 0)
        total += n;
    n = snprintf(text, sizeof text, "%ld", total);
    respond(req, text, (size_t)n);
}

static void serve(int listen_fd)
{
    FCGX_Request req;
    FCGX_InitRequest(&req, listen_fd, 0);
    while (FCGX_Accept_r(&req) >= 0) {
        const char *uri = FCGX_GetParam("REQUEST_URI", req.envp);
        if (uri == NULL)
            uri = "";
        if (strncmp(uri, "/echo", 5) == 0)
            echo_length(&req);
        else if (strncmp(uri, "/64k", 4) == 0)
            respond(&req, big, BIG_SIZE);
        else
            respond(&req, HELLO, sizeof HELLO - 1);
        FCGX_Finish_r(&req);
    }
    _exit(0);
}

static pid_t spawn(int listen_fd)
{
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        serve(listen_fd);
    }
    return pid;
}

static void on_stop(int signum)
{
    (void)signum;
    stopping = 1;
}

int main(int argc, char **argv)
{
    pid_t pids[MAX_WORKERS];
    struct sigaction sa;
    int workers, listen_fd, i;

    if (argc != 4 || (workers = atoi(argv[3])) < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "usage: %s HOST PORT WORKERS(1-%d)\n", argv[0], MAX_WORKERS);
        return 2;
    }
    memset(big, 'x', sizeof big);
    if (FCGX_Init() != 0 || (listen_fd = listen_on(argv[1], atoi(argv[2]))) < 0) {
        perror("hello-fcgi: cannot listen");
        return 1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    for (i = 0; i < workers; i++)
        pids[i] = spawn(listen_fd);
    while (!stopping) {
        pid_t dead = wait(NULL);
        if (dead < 0 && errno != EINTR)
            break;
        for (i = 0; i < workers && !stopping; i++)
            if (pids[i] == dead)
                pids[i] = spawn(listen_fd);
    }
    for (i = 0; i < workers; i++)
        kill(pids[i], SIGTERM);
    while (wait(NULL) > 0 || errno == EINTR)
        ;
    return 0;
}
