/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fusewatch: the in-kernel half of berth's FUSE health watch.
 *
 * Three hooks, each written once and attached one of two ways (the loader
 * tries fentry first and falls back to BTF tracepoints):
 *
 *   process exit   fentry/taskstats_exit     tp_btf/sched_process_exit
 *   request send   fentry/fuse_dev_queue_req tp_btf/fuse_request_send
 *   request end    fentry/fuse_request_end   tp_btf/fuse_request_end
 *
 * Userspace registers the engine processes (WATCHED_TGIDS) and the FUSE
 * connections (WATCHED_CONNS, with an epoch per registration) it cares about.
 * The programs then
 *   - emit EV_EXIT when the last thread of a watched process exits,
 *   - keep every request of a watched connection in INFLIGHT from send to end
 *     (userspace scans it for requests older than its stall threshold),
 *   - emit EV_ABORT when a request of a watched connection ends with
 *     -ECONNABORTED or -ENOTCONN (what fuse_abort_conn and a dead /dev/fuse
 *     give requests).
 * Event layouts are mirrored in src/event.rs; keep them in sync.
 */
#include "kernel.h"

/* GPL: BTF tracepoints and fentry on kernel functions are GPL-only. */
char LICENSE[] SEC("license") = "GPL";

#define EV_EXIT 1
#define EV_ABORT 2

/* One ring-buffer record; 32 bytes, no padding holes. */
struct event {
	__u32 kind;     /* EV_* */
	__u32 id;       /* EV_EXIT: tgid; EV_ABORT: connection id */
	__u64 epoch;    /* EV_ABORT: the registration's epoch; EV_EXIT: 0 */
	__s32 code;     /* EV_EXIT: wait status; EV_ABORT: the request's error */
	__u32 opcode;   /* EV_ABORT: opcode of the request that saw it */
	__u64 ktime_ns; /* bpf_ktime_get_ns() when emitted (CLOCK_MONOTONIC) */
};

/* A registered connection. The epoch tells registrations of a reused id apart. */
struct conn_watch {
	__u64 epoch;
	__u32 abort_sent; /* an EV_ABORT went out for this epoch */
	__u32 _pad;
};

/* A request seen sent and not yet ended, keyed by its struct fuse_req address. */
struct inflight {
	__u64 sent_ns;
	__u64 epoch;
	__u64 unique; /* 0 when the kernel had not numbered it yet at send */
	__u32 conn;
	__u32 opcode;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);   /* tgid */
	__type(value, __u64); /* unused (registration cookie) */
} WATCHED_TGIDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32); /* connection id (fuse_conn.dev) */
	__type(value, struct conn_watch);
} WATCHED_CONNS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* struct fuse_req address */
	__type(value, struct inflight);
} INFLIGHT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} EVENTS SEC(".maps");

static __attribute__((always_inline)) int on_exit(struct task_struct *task, int group_dead)
{
	if (!group_dead)
		return 0;
	__u32 tgid = task->tgid;
	if (!bpf_map_lookup_elem(&WATCHED_TGIDS, &tgid))
		return 0;
	struct event ev = {
		.kind = EV_EXIT,
		.id = tgid,
		.code = task->exit_code,
		.ktime_ns = bpf_ktime_get_ns(),
	};
	bpf_ringbuf_output(&EVENTS, &ev, sizeof(ev), 0);
	/* One event per process: a recycled pid must be registered again. */
	bpf_map_delete_elem(&WATCHED_TGIDS, &tgid);
	return 0;
}

static __attribute__((always_inline)) int on_send(const struct fuse_req *req)
{
	__u32 conn = req->fm->fc->dev;
	struct conn_watch *w = bpf_map_lookup_elem(&WATCHED_CONNS, &conn);
	if (!w)
		return 0;
	__u64 key = (__u64)req;
	struct inflight v = {
		.sent_ns = bpf_ktime_get_ns(),
		.epoch = w->epoch,
		.unique = req->in.h.unique,
		.conn = conn,
		.opcode = req->in.h.opcode,
	};
	/* BPF_ANY: a recycled fuse_req address overwrites whatever was left. */
	bpf_map_update_elem(&INFLIGHT, &key, &v, BPF_ANY);
	return 0;
}

static __attribute__((always_inline)) int on_end(const struct fuse_req *req)
{
	__u64 key = (__u64)req;
	bpf_map_delete_elem(&INFLIGHT, &key);

	int error = req->out.h.error;
	if (error != -ECONNABORTED && error != -ENOTCONN)
		return 0;
	__u32 conn = req->fm->fc->dev;
	struct conn_watch *w = bpf_map_lookup_elem(&WATCHED_CONNS, &conn);
	if (!w || w->abort_sent)
		return 0;
	/* Not atomic: two CPUs may both send; userspace drops the duplicate. */
	w->abort_sent = 1;
	struct event ev = {
		.kind = EV_ABORT,
		.id = conn,
		.epoch = w->epoch,
		.code = error,
		.opcode = req->in.h.opcode,
		.ktime_ns = bpf_ktime_get_ns(),
	};
	bpf_ringbuf_output(&EVENTS, &ev, sizeof(ev), 0);
	return 0;
}

/* --- BTF tracepoints: ctx holds the TP_PROTO arguments, one u64 each. ----- */

SEC("tp_btf/sched_process_exit")
int tp_process_exit(__u64 *ctx)
{
	/* TP_PROTO(struct task_struct *p, bool group_dead) since 6.16. */
	return on_exit((struct task_struct *)ctx[0], (int)(__u8)ctx[1]);
}

SEC("tp_btf/fuse_request_send")
int tp_request_send(__u64 *ctx)
{
	return on_send((const struct fuse_req *)ctx[0]);
}

SEC("tp_btf/fuse_request_end")
int tp_request_end(__u64 *ctx)
{
	return on_end((const struct fuse_req *)ctx[0]);
}

/* --- fentry: ctx holds the function's arguments. -------------------------- */

SEC("fentry/taskstats_exit")
int fe_process_exit(__u64 *ctx)
{
	/* void taskstats_exit(struct task_struct *tsk, int group_dead) */
	return on_exit((struct task_struct *)ctx[0], (int)ctx[1]);
}

SEC("fentry/fuse_dev_queue_req")
int fe_request_send(__u64 *ctx)
{
	/* void fuse_dev_queue_req(struct fuse_iqueue *fiq, struct fuse_req *req) */
	return on_send((const struct fuse_req *)ctx[1]);
}

SEC("fentry/fuse_request_end")
int fe_request_end(__u64 *ctx)
{
	/* void fuse_request_end(struct fuse_req *req) */
	return on_end((const struct fuse_req *)ctx[0]);
}
