/* usock: the smallest Unix-socket client and server, for the busybox test image of the real-node
 * tests (e2e/scripts/node-images.sh; busybox's nc has no -U).
 *   usock serve PATH REPLY   accept forever; answer every connection with REPLY and a newline
 *   usock connect PATH       print what the server sends until it closes
 * Built with `gcc -Os -static`, so it runs in an image made FROM scratch. */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int address(const char *path, struct sockaddr_un *sa) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (strlen(path) >= sizeof sa->sun_path) {
    fprintf(stderr, "usock: path too long: %s\n", path);
    return -1;
  }
  strcpy(sa->sun_path, path);
  return 0;
}

int main(int argc, char **argv) {
  struct sockaddr_un sa;
  if (argc == 4 && strcmp(argv[1], "serve") == 0) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || address(argv[2], &sa) < 0) return 1;
    unlink(argv[2]);
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(s, 16) < 0) {
      perror("usock serve");
      return 1;
    }
    for (;;) {
      int c = accept(s, NULL, NULL);
      if (c < 0) continue;
      dprintf(c, "%s\n", argv[3]);
      close(c);
    }
  }
  if (argc == 3 && strcmp(argv[1], "connect") == 0) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || address(argv[2], &sa) < 0) return 1;
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
      perror("usock connect");
      return 1;
    }
    char buf[4096];
    ssize_t n;
    while ((n = read(s, buf, sizeof buf)) > 0) fwrite(buf, 1, (size_t)n, stdout);
    return n < 0;
  }
  fprintf(stderr, "usage: usock serve PATH REPLY | usock connect PATH\n");
  return 2;
}
