/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The few kernel types and BPF helpers fusewatch.bpf.c uses, written by hand.
 *
 * Every struct carries preserve_access_index: clang records each field access
 * as a CO-RE relocation and the loader (aya) rewrites the offset from the
 * running kernel's BTF (/sys/kernel/btf/vmlinux). So only the fields we read
 * are declared, in any order, and the real layout may differ freely.
 */
#ifndef BERTH_KERNEL_H
#define BERTH_KERNEL_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;

#define CORE __attribute__((preserve_access_index))

/* --- kernel structures (only the fields read) --------------------------- */

struct task_struct {
	int pid;
	int tgid;
	int exit_code; /* wait(2) status: signal number, or exit status << 8 */
} CORE;

struct fuse_in_header {
	__u32 len;
	__u32 opcode;
	__u64 unique;
} CORE;

struct fuse_out_header {
	__u32 len;
	__s32 error;
	__u64 unique;
} CORE;

struct fuse_conn {
	__u32 dev; /* dev_t: the fusectl connection id (anonymous device minor) */
} CORE;

struct fuse_mount {
	struct fuse_conn *fc;
} CORE;

struct fuse_req {
	struct {
		struct fuse_in_header h;
	} in;
	struct {
		struct fuse_out_header h;
	} out;
	struct fuse_mount *fm;
} CORE;

/* --- BTF-defined maps ----------------------------------------------------- */

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_RINGBUF 27

#define BPF_ANY 0
#define BPF_NOEXIST 1

/* --- helpers (numbers from include/uapi/linux/bpf.h, stable ABI) --------- */

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				   __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size,
				  __u64 flags) = (void *)130;

#define ECONNABORTED 103
#define ENOTCONN 107

#endif
