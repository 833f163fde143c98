//! Data-parallel training across processes, one per GPU (issue 13): the rendezvous that
//! starts a group, the liveness watch that stops it when a rank dies, and the local launcher
//! behind `tritter train --gpus N`. The collectives themselves are NCCL's (`nccl.rs`, feature
//! `cuda`); this part is plain TCP and runs (and is tested) on any machine.
//!
//! Conventions are torchrun's, so `torchrun --no-python --nproc-per-node N tritter train ...`
//! and a multi-host launch work the same way as the built-in launcher:
//! `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (the GPU ordinal on this host, default `RANK`),
//! `MASTER_ADDR` (default `127.0.0.1`), `MASTER_PORT` (default 29500), plus
//! `TRITTER_RDZV_PORT` (the port of this rendezvous, default `MASTER_PORT + 1`: torchrun's
//! agent already serves its own store on `MASTER_PORT`) and `TRITTER_DIST_TIMEOUT` (seconds
//! a rank waits for the others' device work, default 300).
//!
//! Rendezvous: rank 0 listens on the rendezvous port; every other rank connects (retrying until
//! the timeout, so start order does not matter) and sends its rank, the world size and a
//! fingerprint of its config, training options and data. Rank 0 checks that every rank is
//! present exactly once and that all fingerprints agree, then sends each the NCCL unique id
//! (or the reason it refuses, so a mismatched rank stops with the same message as rank 0).
//! The connections stay open afterwards as a liveness channel: a process that stops without
//! saying goodbye ([`Group::finish`]) closes its socket, the peers' watch threads see it,
//! and their next wait on the GPU aborts the NCCL communicator instead of hanging. The same
//! connections carry rank 0's "go" ([`Group::release_others`]) after it evaluated or wrote a
//! checkpoint, which the others wait for without a timeout (only rank 0's death ends it).

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Result, TritterError};

/// Bytes of an NCCL unique id (`ncclUniqueId`): the blob rank 0 hands to every rank.
pub const UNIQUE_ID_BYTES: usize = 128;

/// How long a rank waits for the others (rendezvous, a step's collectives) by default.
/// `TRITTER_DIST_TIMEOUT` (seconds) overrides it; evaluation and checkpoints run on rank 0
/// while the others wait in their next collective, so it must exceed those.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long [`launch_local`] lets the other ranks stop by themselves after one failed.
pub const LAUNCH_GRACE: Duration = Duration::from_secs(10);

/// torchrun's default `MASTER_PORT`.
pub const DEFAULT_PORT: u16 = 29500;

const MAGIC: u32 = 0x5452_5454;
const HELLO_BYTES: usize = 24;
const REPLY_OK: u8 = 1;
const REPLY_ERR: u8 = 2;
const BYE: u8 = 0xB7;
const GO: u8 = 0x60;

fn dist_err(rank: usize, detail: impl Into<String>) -> TritterError {
    TritterError::Distributed {
        rank,
        detail: detail.into(),
    }
}

fn parse_timeout(value: Option<String>, rank: usize) -> Result<Duration> {
    let Some(t) = value else {
        return Ok(DEFAULT_TIMEOUT);
    };
    let s = t
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9);
    s.map(Duration::from_secs_f64).ok_or_else(|| {
        dist_err(
            rank,
            format!("TRITTER_DIST_TIMEOUT is {t:?} but expected seconds in (0, 1e9)"),
        )
    })
}

/// `TRITTER_DIST_TIMEOUT` (seconds) or [`DEFAULT_TIMEOUT`].
pub fn env_timeout() -> Result<Duration> {
    parse_timeout(std::env::var("TRITTER_DIST_TIMEOUT").ok(), 0)
}

/// Where this process sits in a data-parallel group (the torchrun environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Processes (GPUs) in the group.
    pub world_size: usize,
    /// CUDA device ordinal of this process on its host.
    pub local_rank: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// `MASTER_PORT` (torchrun's store; kept for the environment of child processes).
    pub master_port: u16,
    /// Port rank 0's rendezvous listens on.
    pub rdzv_port: u16,
    /// How long to wait for the other ranks.
    pub timeout: Duration,
}

impl DistEnv {
    /// The group this process belongs to, from the environment: `None` when `WORLD_SIZE` is
    /// unset (a single-process run); an error naming the variable when one is malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (tests, launchers).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |key: &str, v: &str| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| {
                dist_err(
                    0,
                    format!("{key} is {v:?} but expected a non-negative integer"),
                )
            })
        };
        let world_size = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(dist_err(0, "WORLD_SIZE is 0 but expected >= 1"));
        }
        let rank = match get("RANK") {
            Some(r) => num("RANK", &r)?,
            None if world_size == 1 => 0,
            None => {
                return Err(dist_err(
                    0,
                    format!(
                        "WORLD_SIZE is {world_size} but RANK is unset; set RANK in 0..{world_size}"
                    ),
                ))
            }
        };
        if rank >= world_size {
            return Err(dist_err(
                rank,
                format!("RANK is {rank} but expected < WORLD_SIZE {world_size}"),
            ));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(r) => num("LOCAL_RANK", &r)?,
            None => rank,
        };
        let port = |key: &str| -> Result<Option<u16>> {
            get(key)
                .map(|p| {
                    p.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|&p| p > 0)
                        .ok_or_else(|| {
                            dist_err(
                                rank,
                                format!("{key} is {p:?} but expected a port in 1..65536"),
                            )
                        })
                })
                .transpose()
        };
        let master_port = port("MASTER_PORT")?.unwrap_or(DEFAULT_PORT);
        let rdzv_port = match port("TRITTER_RDZV_PORT")? {
            Some(p) => p,
            None => master_port.checked_add(1).ok_or_else(|| {
                dist_err(
                    rank,
                    "MASTER_PORT is 65535, so the rendezvous port MASTER_PORT + 1 does not \
                     exist; set TRITTER_RDZV_PORT",
                )
            })?,
        };
        let timeout = parse_timeout(get("TRITTER_DIST_TIMEOUT"), rank)?;
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            rdzv_port,
            timeout,
        }))
    }

    /// Rank `rank` of a group of `world_size` processes on this host, rank 0's rendezvous
    /// on `port` (also given as `MASTER_PORT`).
    pub fn local(rank: usize, world_size: usize, port: u16, timeout: Duration) -> Self {
        DistEnv {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rdzv_port: port,
            timeout,
        }
    }

    /// The environment variables that give a child process this place in the group.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("TRITTER_RDZV_PORT", self.rdzv_port.to_string()),
            (
                "TRITTER_DIST_TIMEOUT",
                format!("{}", self.timeout.as_secs_f64()),
            ),
        ]
    }
}

/// What the watch threads saw on the liveness connections: the first failure, how many
/// "go" messages came from rank 0, and whether rank 0 said goodbye.
#[derive(Debug, Default)]
struct PeerWatch {
    state: Mutex<WatchState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WatchState {
    failure: Option<String>,
    go: u64,
    rank0_finished: bool,
}

impl PeerWatch {
    fn update(&self, f: impl FnOnce(&mut WatchState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
        self.changed.notify_all();
    }

    fn fail(&self, why: String) {
        self.update(|s| {
            s.failure.get_or_insert(why);
        });
    }

    fn failure(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.failure.clone())
    }
}

/// A joined data-parallel group: this rank's liveness connections to the others (rank 0
/// holds one per rank, every other rank one to rank 0). Dropping it without
/// [`finish`](Self::finish) closes them, which the peers read as this rank's failure.
#[derive(Debug)]
pub struct Group {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    links: Vec<(usize, TcpStream)>,
    watch: Arc<PeerWatch>,
    /// "go" messages consumed by [`wait_for_rank0`](Self::wait_for_rank0).
    consumed: AtomicU64,
}

impl Group {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// How long a wait on the other ranks may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `Ok` while every peer is alive; else the error naming the rank that stopped.
    pub fn check(&self) -> Result<()> {
        match self.watch.failure() {
            None => Ok(()),
            Some(why) => Err(dist_err(self.rank, why)),
        }
    }

    /// Rank 0: lets the other ranks go on after work only rank 0 does (evaluation, writing a
    /// checkpoint); each of them is in [`wait_for_rank0`](Self::wait_for_rank0). A no-op on
    /// other ranks.
    pub fn release_others(&self) -> Result<()> {
        if self.rank != 0 {
            return Ok(());
        }
        for (peer, mut s) in self.links.iter().map(|(p, s)| (p, s)) {
            s.write_all(&[GO])
                .map_err(|e| dist_err(0, format!("releasing rank {peer}: {e}")))?;
        }
        Ok(())
    }

    /// Ranks other than 0: waits until rank 0 calls [`release_others`](Self::release_others),
    /// without a timeout (rank 0's CPU evaluation may take long) but never past rank 0's
    /// death, which is an error. A no-op on rank 0.
    pub fn wait_for_rank0(&self) -> Result<()> {
        if self.rank == 0 {
            return Ok(());
        }
        let want = self.consumed.fetch_add(1, Ordering::AcqRel) + 1;
        let poisoned = |_| dist_err(self.rank, "a poisoned liveness lock");
        let mut s = self.watch.state.lock().map_err(poisoned)?;
        loop {
            if s.go >= want {
                return Ok(());
            }
            if let Some(why) = &s.failure {
                return Err(dist_err(self.rank, why.clone()));
            }
            if s.rank0_finished {
                return Err(dist_err(
                    self.rank,
                    format!(
                        "rank 0 finished after {} release(s) but this rank waits for release \
                         {want}: the ranks disagree on evaluations or checkpoints (different \
                         options or data)",
                        s.go
                    ),
                ));
            }
            s = self.watch.changed.wait(s).map_err(poisoned)?;
        }
    }

    /// Shuts the liveness links down now (what dropping the group does), so the peers learn
    /// of this rank's failure before a possibly slow NCCL abort.
    pub fn close(&self) {
        for (_, s) in &self.links {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Tells the peers that this rank ended normally and closes the connections.
    pub fn finish(mut self) {
        for (_, s) in &mut self.links {
            let _ = s.write_all(&[BYE]);
            let _ = s.flush();
        }
        // Drop shuts the sockets down.
    }

    fn watch_links(&self) -> Result<()> {
        for (peer, s) in &self.links {
            let mut r = s.try_clone().map_err(|e| {
                dist_err(self.rank, format!("cloning the link to rank {peer}: {e}"))
            })?;
            r.set_read_timeout(None)
                .map_err(|e| dist_err(self.rank, format!("link to rank {peer}: {e}")))?;
            let watch = self.watch.clone();
            let peer = *peer;
            std::thread::Builder::new()
                .name(format!("tritter-watch-{peer}"))
                .spawn(move || {
                    let mut b = [0u8; 1];
                    loop {
                        match r.read(&mut b) {
                            Ok(1) if b[0] == BYE => {
                                if peer == 0 {
                                    watch.update(|s| s.rank0_finished = true);
                                }
                                break;
                            }
                            Ok(1) if b[0] == GO => watch.update(|s| s.go += 1),
                            Ok(1) => {
                                watch.fail(format!("rank {peer} sent {} on its link", b[0]));
                                break;
                            }
                            Ok(_) => {
                                watch.fail(format!(
                                    "rank {peer} stopped: its connection closed before it \
                                     finished (see that rank's output for its error)"
                                ));
                                break;
                            }
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => {
                                watch.fail(format!("the connection to rank {peer} failed: {e}"));
                                break;
                            }
                        }
                    }
                })
                .map_err(|e| dist_err(self.rank, format!("starting a watch thread: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.close();
    }
}

fn hello(rank: usize, world: usize, fingerprint: u64) -> [u8; HELLO_BYTES] {
    let mut h = [0u8; HELLO_BYTES];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(world as u32).to_le_bytes());
    h[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    h
}

fn parse_hello(h: &[u8; HELLO_BYTES]) -> Option<(usize, usize, u64)> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    (u32_at(0) == MAGIC).then(|| {
        (
            u32_at(4) as usize,
            u32_at(8) as usize,
            u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
        )
    })
}

fn send_refusal(s: &mut TcpStream, why: &str) {
    let mut msg = vec![REPLY_ERR];
    msg.extend_from_slice(&(why.len() as u32).to_le_bytes());
    msg.extend_from_slice(why.as_bytes());
    let _ = s.write_all(&msg);
}

/// Joins the group of `env`: rank 0 waits for every other rank, checks their fingerprints
/// (a hash of whatever must agree across ranks: config, options, data) and hands out the
/// id `make_id` makes (called on rank 0 only, after every rank arrived); the others receive
/// it. Fails, never hangs: a rank that does not arrive within `env.timeout`, a duplicate or
/// out-of-range rank, a different world size or fingerprint, a port in use.
pub fn rendezvous(
    env: &DistEnv,
    fingerprint: u64,
    make_id: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES]>,
) -> Result<(Group, [u8; UNIQUE_ID_BYTES])> {
    let deadline = Instant::now() + env.timeout;
    let mut group = Group {
        rank: env.rank,
        world_size: env.world_size,
        timeout: env.timeout,
        links: Vec::new(),
        watch: Arc::new(PeerWatch::default()),
        consumed: AtomicU64::new(0),
    };
    let id = if env.rank == 0 {
        serve(env, fingerprint, deadline, &mut group.links, make_id)?
    } else {
        join(env, fingerprint, deadline, &mut group.links)?
    };
    group.watch_links()?;
    Ok((group, id))
}

fn remaining(rank: usize, deadline: Instant, what: &str) -> Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| dist_err(rank, format!("timed out {what}")))
}

fn serve(
    env: &DistEnv,
    fingerprint: u64,
    deadline: Instant,
    links: &mut Vec<(usize, TcpStream)>,
    make_id: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES]>,
) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let world = env.world_size;
    if world == 1 {
        return make_id();
    }
    let listener = TcpListener::bind(("0.0.0.0", env.rdzv_port)).map_err(|e| {
        dist_err(
            0,
            format!(
                "listening on the rendezvous port {} (TRITTER_RDZV_PORT, default MASTER_PORT + 1): {e}; pick a free port (another run may hold it)",
                env.rdzv_port
            ),
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| dist_err(0, format!("listener: {e}")))?;
    let mut refusal: Option<String> = None;
    while links.len() + 1 < world && refusal.is_none() {
        match listener.accept() {
            Ok((mut s, addr)) => {
                let check = (|| -> std::io::Result<Option<(usize, usize, u64)>> {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut h = [0u8; HELLO_BYTES];
                    s.read_exact(&mut h)?;
                    Ok(parse_hello(&h))
                })();
                let _ = s.set_nodelay(true);
                let (rank, their_world, their_fp) = match check {
                    Ok(Some(v)) => v,
                    // Not one of ours (a port scan, a stale client): ignore it.
                    Ok(None) | Err(_) => continue,
                };
                let why = if their_world != world {
                    Some(format!(
                        "rank {rank} ({addr}) has WORLD_SIZE {their_world} but rank 0 has {world}"
                    ))
                } else if rank == 0 || rank >= world {
                    Some(format!(
                        "a process at {addr} claims RANK {rank} but expected 1..{world}"
                    ))
                } else if links.iter().any(|(r, _)| *r == rank) {
                    Some(format!("two processes claim RANK {rank}"))
                } else if their_fp != fingerprint {
                    Some(format!(
                        "rank {rank} ({addr}) has fingerprint {their_fp:016x} but rank 0 has \
                         {fingerprint:016x}: the ranks differ in config, training options or \
                         data; start every rank with the same arguments"
                    ))
                } else {
                    None
                };
                if let Some(w) = &why {
                    send_refusal(&mut s, w);
                }
                refusal = why;
                if refusal.is_none() {
                    links.push((rank, s));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (1..world)
                        .filter(|r| !links.iter().any(|(l, _)| l == r))
                        .collect();
                    refusal = Some(format!(
                        "ranks {missing:?} did not join within {:.0} s on port {}; start \
                         WORLD_SIZE = {world} processes (or raise TRITTER_DIST_TIMEOUT)",
                        env.timeout.as_secs_f64(),
                        env.rdzv_port
                    ));
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Err(e) => refusal = Some(format!("accepting a rank: {e}")),
        }
    }
    let id = match refusal {
        None => make_id(),
        Some(why) => Err(dist_err(0, why)),
    };
    match id {
        Ok(id) => {
            let mut msg = vec![REPLY_OK];
            msg.extend_from_slice(&id);
            for (r, s) in links.iter_mut() {
                s.write_all(&msg)
                    .map_err(|e| dist_err(0, format!("sending the NCCL id to rank {r}: {e}")))?;
            }
            Ok(id)
        }
        Err(e) => {
            let why = e.to_string();
            for (_, s) in links.iter_mut() {
                send_refusal(s, &why);
            }
            links.clear();
            Err(e)
        }
    }
}

fn join(
    env: &DistEnv,
    fingerprint: u64,
    deadline: Instant,
    links: &mut Vec<(usize, TcpStream)>,
) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let rank = env.rank;
    let target = format!("{}:{}", env.master_addr, env.rdzv_port);
    let mut last = String::from("no attempt");
    let mut s = loop {
        let left = remaining(
            rank,
            deadline,
            &format!("connecting to rank 0 at {target} (last error: {last})"),
        )?;
        let addrs = target
            .to_socket_addrs()
            .map_err(|e| dist_err(rank, format!("resolving MASTER_ADDR {target}: {e}")))?;
        let mut got = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, left.min(Duration::from_secs(2))) {
                Ok(s) => {
                    got = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        match got {
            Some(s) => break s,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let io = |e: std::io::Error| dist_err(rank, format!("talking to rank 0 at {target}: {e}"));
    s.set_nodelay(true).map_err(io)?;
    s.write_all(&hello(rank, env.world_size, fingerprint))
        .map_err(io)?;
    s.set_read_timeout(Some(remaining(rank, deadline, "before rank 0 replied")?))
        .map_err(io)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(|e| {
        dist_err(
            rank,
            format!(
                "waiting for rank 0 at {target} to start the group: {e} (a rank missing or \
                 rank 0 stopped; raise TRITTER_DIST_TIMEOUT if ranks start slowly)"
            ),
        )
    })?;
    match status[0] {
        REPLY_OK => {
            let mut id = [0u8; UNIQUE_ID_BYTES];
            s.read_exact(&mut id).map_err(io)?;
            links.push((0, s));
            Ok(id)
        }
        REPLY_ERR => {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).map_err(io)?;
            let len = u32::from_le_bytes(len).min(1 << 16) as usize;
            let mut why = vec![0u8; len];
            s.read_exact(&mut why).map_err(io)?;
            Err(dist_err(
                rank,
                format!(
                    "rank 0 refused the group: {}",
                    String::from_utf8_lossy(&why)
                ),
            ))
        }
        other => Err(dist_err(
            rank,
            format!("rank 0 replied {other} but expected {REPLY_OK} or {REPLY_ERR}"),
        )),
    }
}

/// FNV-1a hash of `bytes`: how callers turn what must agree across ranks into the
/// rendezvous fingerprint.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    crate::model::fnv1a(bytes, crate::model::FNV_OFFSET)
}

/// A port that was free on this host a moment ago (for a local group's `MASTER_PORT`).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| dist_err(0, format!("finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| dist_err(0, format!("finding a free port: {e}")))
}

/// Runs `program args` as `gpus` processes of one data-parallel group on this host (what
/// `tritter train --gpus N` does): each child gets its [`DistEnv::vars`] (with `timeout`),
/// rank `i` drives GPU `i`. Waits for all. A group with a failed rank cannot finish, so
/// when one fails the others get [`LAUNCH_GRACE`] to stop by themselves (the liveness watch
/// makes them report their side) and are then killed, as torchrun does. Errors name every
/// rank that failed and how.
pub fn launch_local(
    program: &std::path::Path,
    args: &[OsString],
    gpus: usize,
    timeout: Duration,
) -> Result<()> {
    if gpus == 0 {
        return Err(dist_err(0, "--gpus is 0 but expected >= 1"));
    }
    let port = free_port()?;
    let mut children = Vec::with_capacity(gpus);
    for rank in 0..gpus {
        let env = DistEnv::local(rank, gpus, port, timeout);
        let child = std::process::Command::new(program)
            .args(args)
            .envs(env.vars())
            .spawn()
            .map_err(|e| dist_err(rank, format!("starting {}: {e}", program.display())));
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    let grace = LAUNCH_GRACE;
    let mut statuses: Vec<Option<std::process::ExitStatus>> = vec![None; gpus];
    let mut first_failure: Option<Instant> = None;
    loop {
        for (rank, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Ok(Some(st)) = c.try_wait() {
                    statuses[rank] = Some(st);
                    *slot = None;
                    if !st.success() && first_failure.is_none() {
                        first_failure = Some(Instant::now());
                    }
                }
            }
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        if first_failure.is_some_and(|t| t.elapsed() > grace) {
            for (rank, slot) in children.iter_mut().enumerate() {
                if let Some(c) = slot.take() {
                    let mut c = c;
                    let _ = c.kill();
                    statuses[rank] = c.wait().ok();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_some_and(|s| s.success()))
        .map(|(r, s)| match s {
            Some(s) => format!("rank {r} {s}"),
            None => format!("rank {r} killed"),
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(dist_err(
            0,
            format!(
                "{} of {gpus} processes failed: {}",
                failed.len(),
                failed.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    /// The torchrun variables parse, with LOCAL_RANK, address, port and timeout defaults;
    /// no WORLD_SIZE means a single-process run.
    #[test]
    fn env_parses_torchrun_conventions() {
        assert_eq!(DistEnv::from_lookup(env_of(&[])).unwrap(), None);
        let e = DistEnv::from_lookup(env_of(&[("WORLD_SIZE", "4"), ("RANK", "3")]))
            .unwrap()
            .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 3));
        assert_eq!(
            (e.master_addr.as_str(), e.master_port, e.timeout),
            ("127.0.0.1", DEFAULT_PORT, DEFAULT_TIMEOUT)
        );
        let back =
            DistEnv::from_lookup(|k| e.vars().into_iter().find(|(n, _)| *n == k).map(|(_, v)| v))
                .unwrap()
                .unwrap();
        assert_eq!(back, e, "vars() round-trips through from_lookup");
    }

    /// Malformed variables are errors that name the variable and the rule.
    #[test]
    fn env_rejects_bad_values() {
        for (pairs, needle) in [
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE is 0"),
            (vec![("WORLD_SIZE", "x")], "WORLD_SIZE is \"x\""),
            (vec![("WORLD_SIZE", "2")], "RANK is unset"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK is 2"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "0")],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("TRITTER_DIST_TIMEOUT", "-1"),
                ],
                "TRITTER_DIST_TIMEOUT",
            ),
        ] {
            let err = DistEnv::from_lookup(env_of(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    fn group_env(world: usize, timeout_ms: u64) -> Vec<DistEnv> {
        let port = free_port().unwrap();
        (0..world)
            .map(|r| DistEnv::local(r, world, port, Duration::from_millis(timeout_ms)))
            .collect()
    }

    type Joined = Result<(Group, [u8; UNIQUE_ID_BYTES])>;

    fn run_group(envs: Vec<DistEnv>, fingerprints: Vec<u64>) -> Vec<Joined> {
        let id = [7u8; UNIQUE_ID_BYTES];
        let handles: Vec<_> = envs
            .into_iter()
            .zip(fingerprints)
            .map(|(e, fp)| std::thread::spawn(move || rendezvous(&e, fp, || Ok(id))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Every rank of a group gets rank 0's id, whatever order the ranks start in.
    #[test]
    fn rendezvous_hands_rank0_id_to_all() {
        let world = 4;
        let out = run_group(group_env(world, 20_000), vec![42; world]);
        let groups: Vec<Group> = out
            .into_iter()
            .enumerate()
            .map(|(r, g)| {
                let (g, id) = g.unwrap();
                assert_eq!((g.rank(), g.world_size()), (r, world));
                assert_eq!(id, [7u8; UNIQUE_ID_BYTES]);
                g
            })
            .collect();
        for g in &groups {
            g.check().unwrap();
        }
        groups.into_iter().for_each(Group::finish);
    }

    /// A rank with another fingerprint is refused, and every rank learns why.
    #[test]
    fn rendezvous_detects_mismatched_ranks() {
        let out = run_group(group_env(2, 20_000), vec![1, 2]);
        for g in out {
            let err = g.unwrap_err().to_string();
            assert!(err.contains("fingerprint"), "{err}");
        }
    }

    /// A rank that never arrives makes rank 0 fail within the timeout, naming the rank.
    #[test]
    fn rendezvous_times_out_on_missing_rank() {
        let envs = group_env(3, 300);
        let t = Instant::now();
        let out = run_group(envs.into_iter().take(2).collect(), vec![5, 5]);
        assert!(t.elapsed() < Duration::from_secs(30), "bounded wait");
        let err0 = out[0].as_ref().unwrap_err().to_string();
        assert!(
            err0.contains("[2]") && err0.contains("did not join"),
            "{err0}"
        );
        assert!(out[1].is_err(), "rank 1 learns the group failed");
    }

    /// A rank with nobody listening gives up within its timeout.
    #[test]
    fn join_times_out_without_rank0() {
        let envs = group_env(2, 300);
        let err = rendezvous(&envs[1], 0, || unreachable!("rank 1 makes no id"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1") && err.contains("timed out"), "{err}");
    }

    /// Rank 0's "go" releases a waiting rank (also one sent before the wait began); a rank
    /// waiting on a rank 0 that dies gets an error instead of waiting forever.
    #[test]
    fn rank0_release_and_death() {
        let mut out = run_group(group_env(2, 20_000), vec![3, 3]);
        let (g1, _) = out.pop().unwrap().unwrap();
        let (g0, _) = out.pop().unwrap().unwrap();
        g0.release_others().unwrap();
        g1.wait_for_rank0().unwrap();
        g1.release_others().unwrap(); // a no-op off rank 0
        g0.wait_for_rank0().unwrap(); // a no-op on rank 0
        let waiter = std::thread::spawn(move || g1.wait_for_rank0());
        std::thread::sleep(Duration::from_millis(50));
        drop(g0);
        let err = waiter.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank 0 stopped"), "{err}");

        // Rank 0 that finishes normally without the release this rank waits for: an error
        // naming the disagreement, not a wait forever.
        let mut out = run_group(group_env(2, 20_000), vec![4, 4]);
        let (g1, _) = out.pop().unwrap().unwrap();
        let (g0, _) = out.pop().unwrap().unwrap();
        g0.finish();
        let err = g1.wait_for_rank0().unwrap_err().to_string();
        assert!(err.contains("finished after 0 release"), "{err}");
    }

    /// The launcher gives each child its rank's environment, succeeds when all succeed and
    /// names the failing ranks otherwise.
    #[cfg(unix)]
    #[test]
    fn launcher_sets_env_and_reports_failed_ranks() {
        let sh = std::path::Path::new("/bin/sh");
        let args = |script: &str| vec![OsString::from("-c"), OsString::from(script)];
        let t = Duration::from_secs(5);
        launch_local(
            sh,
            &args("test \"$WORLD_SIZE\" = 3 && test \"$LOCAL_RANK\" = \"$RANK\" && test -n \"$MASTER_PORT\""),
            3,
            t,
        )
        .unwrap();
        let err = launch_local(sh, &args("test \"$RANK\" != 1"), 3, t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 of 3") && err.contains("rank 1"), "{err}");
        assert!(launch_local(sh, &args("true"), 0, t).is_err(), "0 GPUs");
    }

    /// A peer that stops without finishing is reported by the others' watch; one that
    /// finishes is not.
    #[test]
    fn watch_reports_dead_rank_not_finished_one() {
        for finish in [true, false] {
            let mut out = run_group(group_env(2, 20_000), vec![9, 9]);
            let (g1, _) = out.pop().unwrap().unwrap();
            let (g0, _) = out.pop().unwrap().unwrap();
            if finish {
                g1.finish();
            } else {
                drop(g1);
            }
            // A failure shows within milliseconds; a finished rank is watched a little longer.
            let patience = Duration::from_millis(if finish { 300 } else { 10_000 });
            let t = Instant::now();
            let mut seen = g0.check();
            while seen.is_ok() && t.elapsed() < patience {
                std::thread::sleep(Duration::from_millis(10));
                seen = g0.check();
            }
            if finish {
                assert!(seen.is_ok(), "a finished rank is not a failure: {seen:?}");
            } else {
                let err = seen.unwrap_err().to_string();
                assert!(err.contains("rank 1 stopped"), "{err}");
            }
        }
    }
}
