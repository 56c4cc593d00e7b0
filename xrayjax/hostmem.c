/* Keeps the large blocks XLA's CPU runtime allocates for each execution, for the next one.
 *
 * xrayjax/hostmem.py compiles this file and preloads it (LD_PRELOAD) into the command-line
 * entry points. XLA's CPU runtime mallocs each execution's temporary buffers as one block
 * (hundreds of MB for a training step) and frees it when the execution ends; glibc maps a block
 * that large afresh every time, so each step faults its memory in again, and on a VM that hands
 * freed memory back to its host, some steps stall while it comes back. Here a freed block of
 * 32 MiB or more stays mapped, and the next request of its size (rounded up to 2 MiB) gets it.
 *
 * Peak memory does not grow: a request that finds no idle block of its size unmaps every idle
 * block before it maps a new one, and a request that finds its size still in use waits up to
 * 20 ms for it (XLA frees an execution's block just after its results are ready, when the next
 * execution may already ask for one). Smaller requests, and every pointer this file did not
 * hand out, go to glibc's allocator.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

void *__libc_malloc(size_t size);
void __libc_free(void *p);
void *__libc_calloc(size_t n, size_t size);
void *__libc_realloc(void *p, size_t size);
void *__libc_memalign(size_t align, size_t size);

/* glibc maps every request of 32 MiB or more afresh (its largest mmap threshold). */
#define BIG ((size_t)32 << 20)
#define PAGE ((size_t)2 << 20) /* a transparent huge page; blocks are aligned to it */
#define SLOTS 64
#define WAIT_NS 20000000L

static struct {
  char *p;
  size_t len;
  int live;
} blocks[SLOTS];
static unsigned long long hits, misses, waits;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t freed = PTHREAD_COND_INITIALIZER;

static void lock_all(void) { pthread_mutex_lock(&lock); }
static void unlock_all(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void init(void) {
  pthread_atfork(lock_all, unlock_all, unlock_all); /* a fork never inherits a held lock */
}

/* The slot of a block this file handed out, or -1. Called with the lock held. */
static int find(const void *p) {
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].p == p) return i;
  return -1;
}

static int maybe_ours(const void *p) { return p && ((uintptr_t)p & (PAGE - 1)) == 0; }

static char *map(size_t len) {
  char *m = mmap(NULL, len + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return NULL;
  char *p = (char *)(((uintptr_t)m + PAGE - 1) & ~(PAGE - 1));
  if (p > m) munmap(m, p - m);
  munmap(p + len, m + PAGE - p);
  madvise(p, len, MADV_HUGEPAGE);
  return p;
}

/* A block of at least `size` bytes (size >= BIG), or NULL for glibc to serve. `*reused` says
 * whether it held earlier data (a fresh mapping reads as zeros). */
static void *take(size_t size, int *reused) {
  size_t len = (size + PAGE - 1) & ~(PAGE - 1);
  struct timespec deadline;
  int waited = 0, timed_out = 0;
  if (len < size) return NULL;
  pthread_mutex_lock(&lock);
  for (;;) {
    int busy = 0;
    for (int i = 0; i < SLOTS; i++) {
      if (!blocks[i].p || blocks[i].len != len) continue;
      if (!blocks[i].live) {
        blocks[i].live = 1;
        hits++;
        pthread_mutex_unlock(&lock);
        *reused = 1;
        return blocks[i].p;
      }
      busy = 1;
    }
    if (!busy || timed_out) break;
    if (!waited) {
      waited = 1;
      waits++;
      clock_gettime(CLOCK_REALTIME, &deadline);
      deadline.tv_nsec += WAIT_NS;
      if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
      }
    }
    timed_out = pthread_cond_timedwait(&freed, &lock, &deadline) == ETIMEDOUT;
  }
  misses++;
  int slot = -1;
  for (int i = 0; i < SLOTS; i++) {
    if (blocks[i].p && !blocks[i].live) {
      munmap(blocks[i].p, blocks[i].len);
      blocks[i].p = NULL;
    }
    if (!blocks[i].p && slot < 0) slot = i;
  }
  char *p = slot >= 0 ? map(len) : NULL;
  if (p) {
    blocks[slot].p = p;
    blocks[slot].len = len;
    blocks[slot].live = 1;
  }
  pthread_mutex_unlock(&lock);
  *reused = 0;
  return p;
}

/* The length of a live block this file handed out, or 0. */
static size_t length(const void *p) {
  size_t len = 0;
  if (!maybe_ours(p)) return 0;
  pthread_mutex_lock(&lock);
  int i = find(p);
  if (i >= 0) len = blocks[i].len;
  pthread_mutex_unlock(&lock);
  return len;
}

void *malloc(size_t size) {
  int reused;
  void *p = size >= BIG ? take(size, &reused) : NULL;
  return p ? p : __libc_malloc(size);
}

void free(void *p) {
  if (maybe_ours(p)) {
    pthread_mutex_lock(&lock);
    int i = find(p);
    if (i >= 0) {
      blocks[i].live = 0;
      pthread_cond_broadcast(&freed);
    }
    pthread_mutex_unlock(&lock);
    if (i >= 0) return;
  }
  __libc_free(p);
}

void *calloc(size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  int reused;
  void *p = total >= BIG ? take(total, &reused) : NULL;
  if (!p) return __libc_calloc(n, size);
  if (reused) memset(p, 0, total);
  return p;
}

void *realloc(void *p, size_t size) {
  size_t len = length(p);
  if (!len) return __libc_realloc(p, size);
  if (size == 0) {
    free(p);
    return NULL;
  }
  if (size >= BIG && size <= len) return p;
  void *q = malloc(size);
  if (!q) return NULL;
  memcpy(q, p, size < len ? size : len);
  free(p);
  return q;
}

void *reallocarray(void *p, size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, total);
}

void *memalign(size_t align, size_t size) {
  int reused;
  void *p = size >= BIG && align <= PAGE ? take(size, &reused) : NULL;
  return p ? p : __libc_memalign(align, size);
}

void *aligned_alloc(size_t align, size_t size) {
  if (align == 0 || (align & (align - 1))) {
    errno = EINVAL;
    return NULL;
  }
  return memalign(align, size);
}

int posix_memalign(void **out, size_t align, size_t size) {
  if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
  void *p = memalign(align, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

size_t malloc_usable_size(void *p) {
  static size_t (*glibc)(void *);
  size_t len = length(p);
  if (len) return len;
  if (!glibc) glibc = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return p && glibc ? glibc(p) : 0;
}

/* For xrayjax/hostmem.py: requests served from a kept block, requests that mapped a new one,
 * requests that waited for their size to be freed, bytes mapped, bytes of them idle. */
void xrayjax_hostmem_stats(unsigned long long out[5]) {
  pthread_mutex_lock(&lock);
  out[0] = hits;
  out[1] = misses;
  out[2] = waits;
  out[3] = out[4] = 0;
  for (int i = 0; i < SLOTS; i++) {
    if (!blocks[i].p) continue;
    out[3] += blocks[i].len;
    if (!blocks[i].live) out[4] += blocks[i].len;
  }
  pthread_mutex_unlock(&lock);
}
