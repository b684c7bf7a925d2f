#define _GNU_SOURCE
#include "quiesce_sys.h"

#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/fiemap.h>

const uint32_t QUIESCE_FIEMAP_EXTENT_LAST = FIEMAP_EXTENT_LAST;
const uint32_t QUIESCE_FIEMAP_EXTENT_UNKNOWN = FIEMAP_EXTENT_UNKNOWN;
const uint32_t QUIESCE_FIEMAP_EXTENT_DELALLOC = FIEMAP_EXTENT_DELALLOC;
const uint32_t QUIESCE_FIEMAP_EXTENT_ENCODED = FIEMAP_EXTENT_ENCODED;
const uint32_t QUIESCE_FIEMAP_EXTENT_UNWRITTEN = FIEMAP_EXTENT_UNWRITTEN;
const uint32_t QUIESCE_FIEMAP_EXTENT_SHARED = FIEMAP_EXTENT_SHARED;

int quiesce_fifreeze(int fd) { return ioctl(fd, FIFREEZE, 0); }
int quiesce_fithaw(int fd) { return ioctl(fd, FITHAW, 0); }
int quiesce_ficlone(int dst_fd, int src_fd) { return ioctl(dst_fd, FICLONE, src_fd); }

int quiesce_fiemap(int fd, uint64_t start, uint64_t length,
                   quiesce_extent *out, uint32_t capacity, int *last) {
    size_t size = sizeof(struct fiemap) + (size_t)capacity * sizeof(struct fiemap_extent);
    struct fiemap *map = calloc(1, size);
    if (map == NULL) { errno = ENOMEM; return -1; }
    map->fm_start = start;
    map->fm_length = length;
    map->fm_flags = FIEMAP_FLAG_SYNC;
    map->fm_extent_count = capacity;
    if (ioctl(fd, FS_IOC_FIEMAP, map) < 0) {
        int saved = errno;
        free(map);
        errno = saved;
        return -1;
    }
    uint32_t count = map->fm_mapped_extents;
    *last = 0;
    for (uint32_t i = 0; i < count; i++) {
        out[i].logical = map->fm_extents[i].fe_logical;
        out[i].physical = map->fm_extents[i].fe_physical;
        out[i].length = map->fm_extents[i].fe_length;
        out[i].flags = map->fm_extents[i].fe_flags;
        if (map->fm_extents[i].fe_flags & FIEMAP_EXTENT_LAST) *last = 1;
    }
    free(map);
    return (int)count;
}

int quiesce_syncfs(int fd) { return syncfs(fd); }
int quiesce_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }
int quiesce_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np(actions, path);
}
int quiesce_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int low) {
    return posix_spawn_file_actions_addclosefrom_np(actions, low);
}

int quiesce_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int64_t quiesce_fiemap_count(int fd) {
    struct fiemap map;
    memset(&map, 0, sizeof(map));
    map.fm_start = 0;
    map.fm_length = ~0ULL;
    map.fm_extent_count = 0;
    if (ioctl(fd, FS_IOC_FIEMAP, &map) < 0) return -1;
    return (int64_t)map.fm_mapped_extents;
}
