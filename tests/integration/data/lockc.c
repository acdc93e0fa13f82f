/* lockc: fcntl record locks on an inherited descriptor, for tests/integration/test_locks.py.
 *
 *   lockc count FD FILE     F_SETLKW a write lock on FD, add 1 to the number in FILE
 *   lockc hold FD DIR       write-lock FD, create DIR/ready, hold until DIR/go exists
 *   lockc test FD           F_GETLK: print "type=R|W|U pid=L_PID"
 *   lockc wait FD [DIR]     F_SETLKW with a SIGUSR1 handler (no SA_RESTART), creating
 *                           DIR/waiting once the handler is in place: print "EINTR"
 *                           when a signal interrupts the wait, else "got"
 *   lockc ofd FD            F_OFD_SETLK non-blocking: print "got" or "busy"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void on_usr1(int sig) { (void)sig; }

static struct flock whole(short type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    return fl;
}

static int exists(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int fd = atoi(argv[2]);
    struct flock fl = whole(F_WRLCK);
    if (!strcmp(argv[1], "count") && argc == 4) {
        if (fcntl(fd, F_SETLKW, &fl) != 0) { perror("F_SETLKW"); return 1; }
        FILE *f = fopen(argv[3], "r");
        int n = 0;
        if (f) { if (fscanf(f, "%d", &n) != 1) n = 0; fclose(f); }
        usleep(20000);
        f = fopen(argv[3], "w");
        if (!f) return 1;
        fprintf(f, "%d\n", n + 1);
        fclose(f);
        return 0;
    }
    if (!strcmp(argv[1], "hold") && argc == 4) {
        if (fcntl(fd, F_SETLKW, &fl) != 0) { perror("F_SETLKW"); return 1; }
        char path[4096];
        snprintf(path, sizeof path, "%s/ready", argv[3]);
        FILE *f = fopen(path, "w");
        if (f) fclose(f);
        while (!exists(argv[3], "go")) usleep(20000);
        return 0;
    }
    if (!strcmp(argv[1], "test")) {
        if (fcntl(fd, F_GETLK, &fl) != 0) { perror("F_GETLK"); return 1; }
        char t = fl.l_type == F_RDLCK ? 'R' : fl.l_type == F_WRLCK ? 'W' : 'U';
        printf("type=%c pid=%d\n", t, (int)fl.l_pid);
        return 0;
    }
    if (!strcmp(argv[1], "wait")) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sigaction(SIGUSR1, &sa, NULL);
        if (argc > 3) {
            char path[4096];
            snprintf(path, sizeof path, "%s/waiting", argv[3]);
            FILE *f = fopen(path, "w");
            if (f) fclose(f);
        }
        for (;;) {
            if (fcntl(fd, F_SETLKW, &fl) == 0) { printf("got\n"); return 0; }
            if (errno == EINTR) { printf("EINTR\n"); return 0; }
            perror("F_SETLKW");
            return 1;
        }
    }
    if (!strcmp(argv[1], "ofd")) {
        fl.l_pid = 0;
        if (fcntl(fd, F_OFD_SETLK, &fl) == 0) { printf("got\n"); return 0; }
        if (errno == EAGAIN || errno == EACCES) { printf("busy\n"); return 0; }
        perror("F_OFD_SETLK");
        return 1;
    }
    return 2;
}
