/* The bench's load client, compiled by run.ts with gcc at bench time (no
 * binary is committed). One thread a client, so that it outpaces every server
 * it drives: the report shows its rate against the runtimes' own sockets.
 *
 * Usage: load ADDRESS PID_A PID_B SHARE REQUESTS CONCURRENCY
 *
 * Each request has its own connection: the pid and a newline, then the reply
 * read to its end. Request i is for PID_A when i % 10 < SHARE / 10, else for
 * PID_B. Prints {"rps", "p50", "p99", "ok", "empty", "errors"}: the rate, the
 * latencies in ms, the replies that are a port, the other replies. */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_un addr = {.sun_family = AF_UNIX};
static socklen_t addr_len;
static int pid_a, pid_b, share, total;
static atomic_int next_index, counts[3]; /* a port, another reply, an error */
static double *latencies;

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* One request on its own connection: 0 a port, 1 another reply, 2 an error. */
static int request(int pid) {
  char buf[64];
  int fd = socket(AF_UNIX, SOCK_STREAM, 0), got = 0, n;
  int len = snprintf(buf, sizeof buf, "%d\n", pid);
  struct timeval timeout = {10, 0};
  if (fd < 0) return 2;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  if (connect(fd, (struct sockaddr *)&addr, addr_len) ||
      send(fd, buf, len, MSG_NOSIGNAL) != len) n = -1;
  else
    while ((n = read(fd, buf + got, sizeof buf - 1 - got)) > 0) got += n;
  close(fd);
  if (n < 0) return 2;
  buf[got] = 0;
  size_t digits = strspn(buf, "0123456789");
  return digits > 0 && (int)digits == got - 1 && buf[digits] == '\n' ? 0 : 1;
}

static void *client(void *unused) {
  for (int i; (i = atomic_fetch_add(&next_index, 1)) < total;) {
    double began = now_ms();
    atomic_fetch_add(&counts[request(i % 10 < share / 10 ? pid_a : pid_b)], 1);
    latencies[i] = now_ms() - began;
  }
  return unused;
}

static int compare(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* The percentile, nearest rank, of the sorted latencies. */
static double percentile(int p) {
  int rank = (p * total + 99) / 100 - 1;
  return latencies[rank < 0 ? 0 : rank];
}

int main(int argc, char **argv) {
  size_t len = argc == 7 ? strlen(argv[1]) : 0;
  if (len == 0 || len >= sizeof addr.sun_path) {
    fprintf(stderr, "usage: load ADDRESS PID_A PID_B SHARE REQUESTS CONCURRENCY\n");
    return 2;
  }
  memcpy(addr.sun_path, argv[1], len);
  if (argv[1][0] == '@') addr.sun_path[0] = 0; /* Linux's abstract namespace */
  addr_len = offsetof(struct sockaddr_un, sun_path) + len + (argv[1][0] != '@');
  pid_a = atoi(argv[2]), pid_b = atoi(argv[3]), share = atoi(argv[4]);
  total = atoi(argv[5]);
  int concurrency = atoi(argv[6]);
  pthread_t threads[concurrency];
  latencies = calloc(total + 1, sizeof *latencies);
  double began = now_ms();
  for (int t = 0; t < concurrency; t++)
    pthread_create(&threads[t], NULL, client, NULL);
  for (int t = 0; t < concurrency; t++) pthread_join(threads[t], NULL);
  double seconds = (now_ms() - began) / 1e3;
  qsort(latencies, total, sizeof *latencies, compare);
  printf("{\"rps\":%.1f,\"p50\":%.4f,\"p99\":%.4f,\"ok\":%d,\"empty\":%d,"
         "\"errors\":%d}\n", total / seconds, percentile(50), percentile(99),
         counts[0], counts[1], counts[2]);
  return 0;
}
