/*
 * pymachine-init: PID 1 of an application machine.
 *
 * Behaves like systemd-nspawn's stub PID 1 (nspawn-stub-pid1.c), tini and
 * catatonit: starts the payload, reaps every zombie, forwards signals to the
 * payload's main process and exits with its status (128+N when signal N
 * killed it). When the payload exits, whatever is left gets SIGTERM, then
 * SIGKILL after the stop timeout.
 *
 * Signals: we wait for every signal (the kernel drops a signal that a PID 1
 * neither blocks nor handles), but SIGKILL and SIGSTOP (which nobody can
 * catch), the C library's two internal ones (32 and 33) and the synchronous
 * ones (a fault of ours, not a message). Each is forwarded, real-time ones
 * included, except:
 * - SIGCHLD: ours, to reap;
 * - the power signals, systemd's conventions (what machinectl sends):
 *   SIGRTMIN+3/+4/+13/+14 halt/power off, SIGRTMIN+5/+6/+15/+16 reboot =
 *   restart the payload inside the same container;
 * - SIGINT sent by kill(2) (machinectl reboot, systemctl kill): a reboot, as
 *   for any container's PID 1. A user's interrupt reaches us otherwise: from
 *   the terminal (the kernel's, SI_KERNEL) or queued (SI_QUEUE) by `pymachine
 *   run` and `pymachine kill`, and is forwarded;
 * - SIGTSTP/SIGTTIN/SIGTTOU: the payload has no terminal job control (its own
 *   session: an orphaned process group), so the kernel would discard their
 *   default action, to stop. When the payload leaves the signal at its
 *   default, its whole job (process group) gets SIGSTOP instead, and SIGCONT
 *   goes to the whole job; a payload that catches or ignores it gets the signal;
 * - with --terminal (`pymachine run` on a terminal), the signals the terminal
 *   itself sends (Ctrl-C, Ctrl-Z, a resize) are not forwarded: the payload,
 *   in the terminal's foreground process group with us, has them already.
 * A SIGTERM is followed by a SIGCONT, as systemd does, so that a stopped
 * payload hears it. SIGABRT is watched and forwarded too: no fault of ours
 * raises it (we never call abort()), and it is systemd's WatchdogSignal=, so
 * a payload that stopped sending WATCHDOG=1 gets it as a plain service would
 * (and systemd kills us after TimeoutAbortSec= if it does not end).
 *
 * Why C, in a Python project: this is the one process pymachine keeps per
 * running machine, for as long as it runs. Python sets the container up,
 * confines it (capabilities, no_new_privs, seccomp) and then execs this
 * program through a file descriptor opened before pivot_root, so nothing of
 * it needs to be inside the image. A CPython PID 1 costs ~3.4 MB Pss per
 * machine, this one a few hundred kB. It is linked statically because the
 * image may have no C library at all (busybox), and it allocates nothing.
 *
 * Usage (machined.runtime.init.command_line builds it):
 *   pymachine-init [--terminal] [--stop-timeout SECONDS] [--chdir DIR]
 *                  [--uid UID] [--gid GID] [--groups GID,GID...]
 *                  [--handover-fd FD] [--notify-fd FD --ready-fd FD [--forward-fd FD]]
 *                  -- COMMAND [ARG...]
 * The payload gets our environment; COMMAND is looked up in its PATH.
 * --notify-fd (Notify=yes): the datagram socket the payload's NOTIFY_SOCKET
 * names. We relay its READY=1, STATUS= and WATCHDOG=1 lines (nothing else: a
 * payload must not move the unit's main PID or file descriptors) to
 * --forward-fd, a socket the runtime connected to systemd's notify socket (we
 * are the unit's main process, NotifyAccess=main), and at the first READY=1
 * write one byte to --ready-fd, the FIFO the unit's ExecStartPost= waits on.
 * The socket signals us with SIGIO (F_SETSIG, si_code POLL_IN): one wait for
 * signals and datagrams alike, no second loop.
 *
 * --health-cmd CMD (HealthCmd=, podman's semantics): `/bin/sh -c CMD` as the
 * payload's user, in its directory, every --health-interval seconds (the
 * first after --health-start-period, or at once), killed after
 * --health-timeout. Exit 0 passes. --health-retries failures in a row (not
 * counting those within the start period) make the machine unhealthy and do
 * --health-on-failure: none; kill (everything SIGKILLed, exit 137: the unit
 * fails); stop (a stop, as SIGTERM); restart (a stop, then exit 133, the
 * unit's RestartForceExitStatus=: systemd restarts it). Each result is written
 * to --health-fd (a host file the runtime opened: "STATUS STREAK\nOUTPUT"),
 * which status shows; --ready-on-healthy (Notify=healthy) writes the
 * --ready-fd byte at the first pass instead of at READY=1.
 * --handover-fd (service machines): the runtime's pipe; the payload starts once it
 * reaches EOF (the runtime registered the machine and handed the unit over),
 * and we live at least ADOPTION_GRACE seconds after that.
 * Exit status: the payload's; 127 when COMMAND is not found, 126 when it
 * cannot be run; 1 for a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_GROUPS 256
#define NO_PID (-2) /* matches no child */

struct payload {
    char **argv;
    const char *directory;
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    size_t n_groups;
    int change_user;
    int terminal; /* attached to the user's terminal (pymachine run) */
    double stop_timeout;
    int handover_fd; /* service mode: the runtime's pipe, -1 otherwise */
    int notify_fd;   /* Notify=yes: the payload's NOTIFY_SOCKET, -1 otherwise */
    int ready_fd;    /* the FIFO the unit's ExecStartPost= waits on */
    int forward_fd;  /* connected to systemd's notify socket, -1: none */
    const char *health_cmd; /* HealthCmd=, NULL: none */
    double health_interval, health_timeout, health_start_period;
    int health_retries;
    int health_action; /* HEALTH_NONE ... */
    int health_fd;     /* the state file, -1: none */
    int ready_on_healthy;
};

enum { HEALTH_NONE, HEALTH_KILL, HEALTH_STOP, HEALTH_RESTART };
#define HEALTH_OUTPUT 512
#define RESTART_EXIT_STATUS 133 /* the unit's RestartForceExitStatus= */

static struct health {
    pid_t pid;          /* the running check, 0: none */
    int output_fd;      /* its stdout and stderr */
    double started, next, start_period_end;
    int streak, passed_once, exited, status;
    char output[HEALTH_OUTPUT];
    size_t used;
} health;

static int ready_sent;

/* Service mode: systemd takes us as the unit's main process when it reads the
 * PID file, on the runtime's exit. We must still be alive then (a zombie is
 * refused: result 'protocol'), even if the payload is done at once. */
#define ADOPTION_GRACE 0.1
/* A stop request (SIGTERM, a power signal) tells that systemd has us already:
 * no grace needed then, the stop must not wait for it. */
static int stop_requested;

/* A fault of the process that gets them: never blocked, never forwarded. */
static const int synchronous[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS};
static const int poweroff_offsets[] = {3, 4, 13, 14};
static const int reboot_offsets[] = {5, 6, 15, 16};

static void warn(const char *what, const char *detail) {
    fprintf(stderr, "pymachine-init: %s: %s\n", what, detail);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct timespec as_timespec(double seconds) {
    struct timespec ts;
    if (seconds < 0)
        seconds = 0;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    return ts;
}

static int in_offsets(int sig, const int *offsets, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (sig == SIGRTMIN + offsets[i])
            return 1;
    return 0;
}

static int is_poweroff(int sig) { return in_offsets(sig, poweroff_offsets, 4); }
static int is_reboot(int sig) { return in_offsets(sig, reboot_offsets, 4); }

/* All signals but the synchronous ones (sigfillset leaves out the C library's
 * own; SIGKILL and SIGSTOP cannot be blocked). */
static void watched_signals(sigset_t *set) {
    sigfillset(set);
    for (size_t i = 0; i < sizeof(synchronous) / sizeof(synchronous[0]); i++)
        sigdelset(set, synchronous[i]);
}

static int exit_status(int wait_status) {
    if (WIFSIGNALED(wait_status))
        return 128 + WTERMSIG(wait_status);
    return WEXITSTATUS(wait_status);
}

/* The payload's process: a clean signal state (no blocked or ignored signal
 * leaks from us or from the Python that set the container up), its own
 * session unless it shares the user's terminal, its directory and user. */
static void exec_payload(const struct payload *p, char **argv) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL); /* SIGKILL/SIGSTOP and the libc-internal ones just fail */
    if (!p->terminal)
        setsid();
    if (chdir(p->directory) < 0) {
        warn(p->directory, strerror(errno));
        _exit(126);
    }
    if (p->change_user) {
        if (setgroups(p->n_groups, p->groups) < 0 || setgid(p->gid) < 0 || setuid(p->uid) < 0) {
            warn("cannot change user", strerror(errno));
            _exit(126);
        }
    }
    execvp(argv[0], argv); /* the PATH of our environment, the payload's */
    int error = errno;
    warn(argv[0], error == ENOENT ? "command not found" : strerror(error));
    _exit(error == ENOENT ? 127 : 126);
}

static pid_t spawn(const struct payload *p) {
    pid_t pid = fork();
    if (pid == 0)
        exec_payload(p, p->argv);
    if (pid < 0)
        warn("cannot start the payload", strerror(errno));
    return pid;
}

/* Reap every exited child; store MAIN's wait status and return 1 if it exited. */
static int reap(pid_t main_pid, int *main_status) {
    int found = 0;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return found; /* 0: children left, none exited; -1: no children */
        if (pid == main_pid) {
            *main_status = status;
            found = 1;
        } else if (health.pid > 0 && pid == health.pid) {
            health.exited = 1;
            health.status = status;
        }
    }
}

static void signal_quietly(pid_t pid, int sig) {
    (void)kill(pid, sig); /* ESRCH: it is gone already, fine */
}

/* A SIGINT is a user's interrupt when the terminal (the kernel) or a queue
 * (pymachine run and kill) sent it; kill(2), what machinectl reboot uses, asks
 * for a reboot. */
static int is_interrupt(const siginfo_t *info) {
    return info->si_code == SI_KERNEL || info->si_code == SI_QUEUE;
}

static int is_job_stop(int sig) { return sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU; }

/* The hexadecimal mask after LABEL in /proc/PID/status ("SigCgt:"...), 0 if absent. */
static unsigned long long status_mask(const char *status, const char *label) {
    const char *at = strstr(status, label);
    return at ? strtoull(at + strlen(label), NULL, 16) : 0;
}

/* Whether PID leaves SIG at its default action: neither caught nor ignored.
 * Unreadable (no /proc): assume it does. */
static int takes_default(pid_t pid, int sig) {
    char path[32], status[4096];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    size_t size = 0;
    ssize_t n;
    while (size < sizeof(status) - 1 &&
           ((n = read(fd, status + size, sizeof(status) - 1 - size)) > 0 ||
            (n < 0 && errno == EINTR)))
        size += n > 0 ? (size_t)n : 0;
    close(fd);
    status[size] = '\0';
    unsigned long long handled = status_mask(status, "\nSigIgn:");
    handled |= status_mask(status, "\nSigCgt:");
    return !(handled & (1ULL << (sig - 1)));
}

/* SIG to the payload's process group (a session of its own: its whole job),
 * or to the main process alone when it has none (--terminal: it is ours). */
static void signal_job(pid_t main_pid, int sig) {
    if (kill(-main_pid, sig) < 0)
        signal_quietly(main_pid, sig);
}

/* Pass SIG on to the payload's main process. A job-control stop it would
 * take the default action of (which the kernel discards for it) stops its
 * whole job with SIGSTOP, as a terminal's Ctrl-Z would; SIGCONT resumes the
 * whole job. A SIGTERM is followed by a SIGCONT: a stopped payload hears it. */
static void forward(pid_t main_pid, int sig) {
    if (is_job_stop(sig) && takes_default(main_pid, sig)) {
        signal_job(main_pid, SIGSTOP);
    } else if (sig == SIGCONT) {
        signal_job(main_pid, SIGCONT);
    } else {
        signal_quietly(main_pid, sig);
        if (sig == SIGTERM)
            signal_job(main_pid, SIGCONT);
    }
}

/* SIGTERM everything left, SIGKILL after GRACE seconds, reap it all. Processes
 * we are not the parent of (joined by `pymachine exec`) show as zombies until
 * their parent outside reaps them and send us no SIGCHLD: poll for them,
 * starting at 1 ms, so a clean exit is not held up by a fixed sleep. */
static void drain(double grace) {
    int ignored;
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    signal_quietly(-1, SIGTERM); /* as PID 1, -1 is every process in the container but us */
    signal_quietly(-1, SIGCONT);
    double deadline = now() + grace;
    double pause = 0.001;
    for (double t = now(); t < deadline; t = now()) {
        reap(NO_PID, &ignored);
        if (kill(-1, 0) < 0 && errno == ESRCH)
            return;
        double left = deadline - t;
        struct timespec ts = as_timespec(pause < left ? pause : left);
        sigtimedwait(&chld, NULL, &ts);
        if (pause < 0.05)
            pause *= 2;
    }
    signal_quietly(-1, SIGKILL);
    while (wait(NULL) > 0 || errno == EINTR)
        ;
}

/* Block until every writer of FD is gone (the runtime exited); the time of that. */
static double wait_for_handover(int fd) {
    char buffer[64];
    ssize_t n;
    do
        n = read(fd, buffer, sizeof(buffer)); /* no data is expected: EOF is the message */
    while (n > 0 || (n < 0 && errno == EINTR));
    close(fd);
    return now();
}

static void stay_until(double deadline) {
    for (double left = deadline - now(); left > 0; left = deadline - now()) {
        struct timespec ts = as_timespec(left);
        nanosleep(&ts, NULL);
    }
}

/* Whether LINE (LEN bytes, no newline) is one we pass on to systemd. */
static int relayed(const char *line, size_t len) {
    static const char *const kept[] = {"READY=1", "WATCHDOG=1"};
    for (size_t i = 0; i < sizeof(kept) / sizeof(kept[0]); i++)
        if (len == strlen(kept[i]) && memcmp(line, kept[i], len) == 0)
            return 1;
    return len >= 7 && memcmp(line, "STATUS=", 7) == 0;
}

/* Read every datagram waiting on the notify socket; relay what we keep. */
static void relay_notifications(const struct payload *p) {
    static char in[4096], out[4096];
    if (p->notify_fd < 0)
        return;
    for (;;) {
        ssize_t n = recv(p->notify_fd, in, sizeof(in) - 1, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return; /* EAGAIN: drained */
        if ((size_t)n >= sizeof(in))
            continue; /* truncated: not a message we could read whole */
        size_t used = 0;
        int ready = 0;
        for (char *line = in; line < in + n;) {
            char *end = memchr(line, '\n', (size_t)(in + n - line));
            size_t len = end ? (size_t)(end - line) : (size_t)(in + n - line);
            if (relayed(line, len) && memchr(line, '\0', len) == NULL) {
                memcpy(out + used, line, len);
                used += len;
                out[used++] = '\n';
                ready |= len == 7 && memcmp(line, "READY=1", 7) == 0;
            }
            line += len + 1;
        }
        if (used && p->forward_fd >= 0)
            (void)send(p->forward_fd, out, used, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (ready && !ready_sent && !p->ready_on_healthy && p->ready_fd >= 0) {
            ready_sent = write(p->ready_fd, "R", 1) == 1;
        }
    }
}

static void watch_notify_socket(const struct payload *p) {
    int fds[] = {p->notify_fd, p->ready_fd, p->forward_fd, p->health_fd};
    for (size_t i = 0; i < 4; i++)
        if (fds[i] >= 0)
            fcntl(fds[i], F_SETFD, FD_CLOEXEC); /* ours: the payload gets no descriptor */
    if (p->notify_fd < 0)
        return;
    fcntl(p->notify_fd, F_SETOWN, getpid());
    fcntl(p->notify_fd, F_SETSIG, SIGIO);
    fcntl(p->notify_fd, F_SETFL, fcntl(p->notify_fd, F_GETFL) | O_ASYNC | O_NONBLOCK);
}

static void health_start(const struct payload *p) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        char *argv[] = {"/bin/sh", "-c", (char *)p->health_cmd, NULL};
        exec_payload(p, argv); /* its own session: killed as a whole on time-out */
    }
    close(pipefd[1]);
    if (pid < 0) {
        close(pipefd[0]);
        return;
    }
    fcntl(pipefd[0], F_SETFL, O_NONBLOCK);
    health.pid = pid;
    health.output_fd = pipefd[0];
    health.started = now();
    health.exited = 0;
    health.used = 0;
}

static void health_read_output(void) {
    ssize_t n;
    char discard[256];
    while (health.output_fd >= 0) {
        size_t room = sizeof(health.output) - 1 - health.used;
        n = room ? read(health.output_fd, health.output + health.used, room)
                 : read(health.output_fd, discard, sizeof(discard));
        if (n > 0 && room)
            health.used += (size_t)n;
        if (n <= 0 && !(n < 0 && errno == EINTR))
            break;
    }
}

static void health_write_state(const struct payload *p, const char *state) {
    if (p->health_fd < 0)
        return;
    char text[HEALTH_OUTPUT + 64];
    int n = snprintf(text, sizeof(text), "%s %d\n", state, health.streak);
    memcpy(text + n, health.output, health.used);
    n += (int)health.used;
    if (ftruncate(p->health_fd, 0) == 0)
        (void)pwrite(p->health_fd, text, (size_t)n, 0);
}

/* A check ended (or timed out): count it; the action to take, HEALTH_NONE if none. */
static int health_finish(const struct payload *p, int timed_out) {
    health_read_output();
    if (timed_out) {
        kill(-health.pid, SIGKILL);
        waitpid(health.pid, NULL, 0);
        const char note[] = "(timed out)";
        if (health.used + sizeof(note) < sizeof(health.output)) {
            memcpy(health.output + health.used, note, sizeof(note) - 1);
            health.used += sizeof(note) - 1;
        }
    }
    close(health.output_fd);
    health.output_fd = -1;
    health.pid = 0;
    double t = now();
    health.next = t + p->health_interval;
    int passed = !timed_out && WIFEXITED(health.status) && WEXITSTATUS(health.status) == 0;
    if (passed) {
        health.streak = 0;
        health.passed_once = 1;
        health_write_state(p, "healthy");
        if (p->ready_on_healthy && !ready_sent && p->ready_fd >= 0)
            ready_sent = write(p->ready_fd, "R", 1) == 1;
        return HEALTH_NONE;
    }
    if (!health.passed_once && t < health.start_period_end) {
        health_write_state(p, "starting"); /* not counted: the payload may still be starting */
        return HEALTH_NONE;
    }
    health.streak++;
    if (health.streak < p->health_retries) {
        health_write_state(p, health.passed_once ? "healthy" : "starting");
        return HEALTH_NONE;
    }
    health_write_state(p, "unhealthy");
    if (p->health_action == HEALTH_NONE)
        return HEALTH_NONE;
    static const char *const actions[] = {"", "killing", "stopping", "restarting"};
    char shown[HEALTH_OUTPUT];
    size_t n = health.used;
    while (n && (health.output[n - 1] == '\n' || health.output[n - 1] == ' '))
        n--;
    for (size_t i = 0; i < n; i++) /* one journal line */
        shown[i] = health.output[i] == '\n' ? ' ' : health.output[i];
    shown[n] = '\0';
    fprintf(stderr, "pymachine-init: health check failed %d times in a row: %s the machine (last output: %s)\n",
            health.streak, actions[p->health_action], shown);
    return p->health_action;
}

/* Seconds until the next health event (a check to start, one to time out). */
static double health_wait(const struct payload *p) {
    if (!p->health_cmd)
        return 1.0;
    double due = health.pid ? health.started + p->health_timeout : health.next;
    return due - now();
}

/* Be PID 1 until the payload ends (WATCHED is blocked); the status to exit with. */
static int supervise(const struct payload *p, const sigset_t *watched) {
    pid_t main_pid = spawn(p);
    if (main_pid < 0)
        return 1;
    double stopping_since = -1; /* < 0: not stopping */
    int rebooting = 0;
    int health_exit = -1; /* a health action's exit status, -1: none */
    if (p->health_cmd) {
        health.next = now() + p->health_start_period;
        health.start_period_end = health.next;
        health.output_fd = -1;
        health_write_state(p, "starting");
    }
    for (;;) {
        double timeout = 1.0;
        if (p->health_cmd && stopping_since < 0) {
            double due = health_wait(p);
            if (due < timeout)
                timeout = due > 0.001 ? due : 0.001;
        }
        if (stopping_since >= 0) {
            timeout = stopping_since + p->stop_timeout - now();
            if (timeout < 0.01)
                timeout = 0.01;
        }
        struct timespec ts = as_timespec(timeout);
        siginfo_t info;
        int sig = sigtimedwait(watched, &info, &ts);
        if (stopping_since >= 0 && now() >= stopping_since + p->stop_timeout)
            signal_quietly(-1, SIGKILL); /* the payload ignored the request: escalate */
        if (p->health_cmd && stopping_since < 0) {
            int action = HEALTH_NONE;
            if (health.pid && health.exited)
                action = health_finish(p, 0);
            else if (health.pid && now() >= health.started + p->health_timeout)
                action = health_finish(p, 1);
            else if (!health.pid && now() >= health.next)
                health_start(p);
            if (action == HEALTH_KILL) {
                signal_quietly(-1, SIGKILL);
                while (wait(NULL) > 0 || errno == EINTR)
                    ;
                return 128 + SIGKILL;
            }
            if (action != HEALTH_NONE) {
                health_exit = action == HEALTH_RESTART ? RESTART_EXIT_STATUS : 0;
                stop_requested = 1;
                stopping_since = now();
                forward(main_pid, SIGTERM);
            }
        }
        if (sig < 0 || (sig == SIGIO && info.si_code > 0)) {
            relay_notifications(p); /* our socket's SIGIO (the kernel's: si_code > 0) */
            continue;               /* or a timeout, EINTR */
        }
        if (sig == SIGCHLD) {
            int status;
            if (!reap(main_pid, &status)) {
                if (health.pid && health.exited) {
                    int action = health_finish(p, 0);
                    if (action == HEALTH_KILL) {
                        signal_quietly(-1, SIGKILL);
                        while (wait(NULL) > 0 || errno == EINTR)
                            ;
                        return 128 + SIGKILL;
                    }
                    if (action != HEALTH_NONE && stopping_since < 0) {
                        health_exit = action == HEALTH_RESTART ? RESTART_EXIT_STATUS : 0;
                        stop_requested = 1;
                        stopping_since = now();
                        forward(main_pid, SIGTERM);
                    }
                }
                continue;
            }
            drain(p->stop_timeout);
            if (health_exit >= 0)
                return health_exit;
            if (!rebooting)
                return exit_status(status);
            main_pid = spawn(p);
            if (main_pid < 0)
                return 1;
            rebooting = 0;
            stopping_since = -1;
            continue;
        }
        if (p->terminal && info.si_code == SI_KERNEL)
            continue; /* the terminal's own: the payload has it too */
        if (is_poweroff(sig) || is_reboot(sig) || (sig == SIGINT && !is_interrupt(&info))) {
            stop_requested = 1;
            rebooting = !is_poweroff(sig);
            stopping_since = now();
            forward(main_pid, SIGTERM);
            continue;
        }
        if (sig == SIGTERM && stopping_since < 0) {
            stopping_since = now();
            stop_requested = 1;
        }
        forward(main_pid, sig);
    }
}

static int run(const struct payload *p) {
    sigset_t watched;
    watched_signals(&watched);
    /* Pending signals wait for us, none is lost (the runtime blocked them all
     * before it exec'd us: this unblocks the synchronous ones). */
    sigprocmask(SIG_SETMASK, &watched, NULL);
    watch_notify_socket(p);
    double adopted = p->handover_fd >= 0 ? wait_for_handover(p->handover_fd) : -1;
    int status = supervise(p, &watched);
    if (adopted >= 0 && !stop_requested)
        stay_until(adopted + ADOPTION_GRACE);
    return status;
}

static int parse_number(const char *text, unsigned long *out) {
    char *end;
    errno = 0;
    *out = strtoul(text, &end, 10);
    return errno == 0 && end != text && *end == '\0';
}

static int parse_seconds(const char *text, double *out) {
    char *end;
    *out = strtod(text, &end);
    return end != text && *end == '\0' && *out >= 0;
}

static int parse_action(const char *text, int *out) {
    static const char *const names[] = {"none", "kill", "stop", "restart"};
    for (int i = 0; i < 4; i++)
        if (strcmp(text, names[i]) == 0) {
            *out = i;
            return 1;
        }
    return 0;
}

static int parse_groups(char *text, struct payload *p) {
    for (char *item = strtok(text, ","); item; item = strtok(NULL, ",")) {
        unsigned long gid;
        if (p->n_groups == MAX_GROUPS || !parse_number(item, &gid))
            return 0;
        p->groups[p->n_groups++] = (gid_t)gid;
    }
    return 1;
}

static int parse(int argc, char **argv, struct payload *p) {
    unsigned long number;
    p->directory = "/";
    p->stop_timeout = 10.0;
    p->handover_fd = -1;
    p->notify_fd = p->ready_fd = p->forward_fd = p->health_fd = -1;
    p->health_interval = p->health_timeout = 30;
    p->health_retries = 3;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(flag, "--") == 0) {
            p->argv = &argv[i + 1];
            return i + 1 < argc;
        } else if (strcmp(flag, "--terminal") == 0) {
            p->terminal = 1;
            continue;
        } else if (strcmp(flag, "--ready-on-healthy") == 0) {
            p->ready_on_healthy = 1;
            continue;
        }
        if (!value)
            return 0;
        i++;
        if (strcmp(flag, "--stop-timeout") == 0) {
            char *end;
            p->stop_timeout = strtod(value, &end);
            if (end == value || *end || p->stop_timeout < 0)
                return 0;
        } else if (strcmp(flag, "--chdir") == 0) {
            p->directory = value;
        } else if (strcmp(flag, "--uid") == 0 && parse_number(value, &number)) {
            p->uid = (uid_t)number;
            p->change_user = 1;
        } else if (strcmp(flag, "--gid") == 0 && parse_number(value, &number)) {
            p->gid = (gid_t)number;
            p->change_user = 1;
        } else if (strcmp(flag, "--groups") == 0 && parse_groups(argv[i], p)) {
            p->change_user = 1;
        } else if (strcmp(flag, "--handover-fd") == 0 && parse_number(value, &number)) {
            p->handover_fd = (int)number;
        } else if (strcmp(flag, "--notify-fd") == 0 && parse_number(value, &number)) {
            p->notify_fd = (int)number;
        } else if (strcmp(flag, "--ready-fd") == 0 && parse_number(value, &number)) {
            p->ready_fd = (int)number;
        } else if (strcmp(flag, "--forward-fd") == 0 && parse_number(value, &number)) {
            p->forward_fd = (int)number;
        } else if (strcmp(flag, "--health-fd") == 0 && parse_number(value, &number)) {
            p->health_fd = (int)number;
        } else if (strcmp(flag, "--health-cmd") == 0) {
            p->health_cmd = value;
        } else if (strcmp(flag, "--health-interval") == 0 && parse_seconds(value, &p->health_interval)) {
        } else if (strcmp(flag, "--health-timeout") == 0 && parse_seconds(value, &p->health_timeout)) {
        } else if (strcmp(flag, "--health-start-period") == 0 &&
                   parse_seconds(value, &p->health_start_period)) {
        } else if (strcmp(flag, "--health-retries") == 0 && parse_number(value, &number) && number > 0) {
            p->health_retries = (int)number;
        } else if (strcmp(flag, "--health-on-failure") == 0 && parse_action(value, &p->health_action)) {
        } else {
            return 0;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    static struct payload payload;
    if (getpid() != 1) { /* kill(-1, ...) below would reach every process we may signal */
        fputs("pymachine-init: must run as PID 1 of a PID namespace\n", stderr);
        return 1;
    }
    /* Executed through a file descriptor, our name would be its number. */
    prctl(PR_SET_NAME, "pymachine-init", 0, 0, 0);
    if (!parse(argc, argv, &payload)) {
        fputs("usage: pymachine-init [--terminal] [--stop-timeout SECONDS] [--chdir DIR] "
              "[--uid UID] [--gid GID] [--groups GID,...] [--handover-fd FD] "
              "[--notify-fd FD --ready-fd FD [--forward-fd FD]] "
              "-- COMMAND [ARG...]\n",
              stderr);
        return 1;
    }
    return run(&payload);
}
