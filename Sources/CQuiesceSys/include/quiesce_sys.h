#ifndef QUIESCE_SYS_H
#define QUIESCE_SYS_H

#include <stdint.h>

/* Thin wrappers around ioctls that Swift cannot call (ioctl is variadic).
   Each returns 0 on success or -1 with errno set, like the syscall. */

#include <spawn.h>

/* GNU extensions that Glibc's Swift module does not export. */
int quiesce_syncfs(int fd);
int quiesce_pipe_cloexec(int fds[2]);
int quiesce_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path);
/* Close every descriptor from `low` up in the child, so it inherits only stdin/out/err. */
int quiesce_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int low);

/* FIFREEZE / FITHAW on an open descriptor of a mount point. */
int quiesce_fifreeze(int fd);
int quiesce_fithaw(int fd);

/* FICLONE: make dst share all of src's extents (XFS reflink=1, btrfs). */
int quiesce_ficlone(int dst_fd, int src_fd);

/* One extent as FIEMAP reports it. */
typedef struct {
    uint64_t logical;
    uint64_t physical;
    uint64_t length;
    uint32_t flags;
} quiesce_extent;

/* FIEMAP with FIEMAP_FLAG_SYNC from `start` for `length` bytes.
   Fills at most `capacity` extents into `out`; returns the count, or -1 with errno.
   `*last` is set to 1 when the last returned extent carries FIEMAP_EXTENT_LAST. */
int quiesce_fiemap(int fd, uint64_t start, uint64_t length,
                   quiesce_extent *out, uint32_t capacity, int *last);

/* FIEMAP extent flags, re-exported for Swift. */
extern const uint32_t QUIESCE_FIEMAP_EXTENT_LAST;
extern const uint32_t QUIESCE_FIEMAP_EXTENT_UNKNOWN;
extern const uint32_t QUIESCE_FIEMAP_EXTENT_DELALLOC;
extern const uint32_t QUIESCE_FIEMAP_EXTENT_ENCODED;
extern const uint32_t QUIESCE_FIEMAP_EXTENT_UNWRITTEN;
extern const uint32_t QUIESCE_FIEMAP_EXTENT_SHARED;
/* Flags under which FIEMAP cannot vouch for an extent's address or bytes (change
   tracking compares such ranges by content). Values from linux/fiemap.h (UAPI, stable). */
static const uint32_t QUIESCE_FIEMAP_EXTENT_DATA_ENCRYPTED = 0x00000080;
static const uint32_t QUIESCE_FIEMAP_EXTENT_NOT_ALIGNED = 0x00000100;
static const uint32_t QUIESCE_FIEMAP_EXTENT_DATA_INLINE = 0x00000200;
static const uint32_t QUIESCE_FIEMAP_EXTENT_DATA_TAIL = 0x00000400;

/* Deallocate [offset, offset+length) so it reads as zeros, keeping the file size
   (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE). Returns 0 or -1 with errno. */
int quiesce_punch_hole(int fd, uint64_t offset, uint64_t length);

/* How many extents FIEMAP reports for the whole file, without listing them (no sync:
   an estimate for planning). Returns the count or -1 with errno. */
int64_t quiesce_fiemap_count(int fd);

#endif
