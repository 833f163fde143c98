//! Synthetic multi-step reasoning tasks, as in the Coconut paper (Hao et al., 2024): each
//! generator produces [`ReasoningExample`]s whose steps are the chain of thought, so that a
//! latent curriculum can replace them with continuous thoughts and evaluation can check the
//! answer exactly.
//!
//! * [`ArithmeticChain`] (`"arith"`): `a=7; b=a+5; c=b*2; d=c-3; d?`, steps `b=12`, `c=24`,
//!   `d=21` (each ending with a line break, [`STEP_END`]), answer `21`. Values stay in `0..=99` with ordinary arithmetic (an operation is
//!   drawn only among those that keep the result in range), difficulty = number of steps.
//! * [`GraphReachability`] (`"reach"`, ProsQA-like): a random DAG given as its edge list,
//!   `edges: C>F, A>C, F>B. is B reachable from A?`; answer `yes` or `no`, alternating, so a
//!   set is balanced. For `yes` the steps are the hops of a shortest path (`A>C`, `C>F`,
//!   `F>B`); for `no` they are the breadth-first levels reached from the source (`C D`, `F`),
//!   which end without the target. Difficulty = hops of the planted path.
//!
//! # Tokens
//!
//! Every piece (question, each step, answer) is plain byte tokens of the crate's byte-level
//! tokenizer ([`encode_bytes`] without a modality prefix: byte `b` is id `8 + b`), with no
//! `<text>`, `<bos>` or `<eos>`: the curriculum frames the sequence. Byte ids exist in every
//! vocab layout (`vocab >= 264`), and [`MultimodalTokenizer::decode`](crate::tokenizer::MultimodalTokenizer::decode)
//! reads prefix-less byte ids as text, so the pieces decode back to their text exactly.
//!
//! # Determinism
//!
//! Example `i` of a set depends only on `(seed, i, difficulty)` (its own SplitMix64 stream),
//! so `generate(n, seed, d)` is a prefix of `generate(m, seed, d)` for `n <= m`.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use super::ReasoningExample;
use crate::model::SeededRng;
use crate::tokenizer::bytes::encode_bytes;
use crate::tokenizer::vocab::{SpecialToken, BYTE_OFFSET, NUM_BYTE_TOKENS};
use crate::{Result, TritterError};

/// The end of every reasoning step: a step is one line, so a generated chain of thought
/// reads as lines and its answer is what follows the last line break
/// ([`experiment::answer_of`](super::experiment::answer_of)).
pub const STEP_END: &str = "\n";
/// Most steps of an [`ArithmeticChain`] (one variable per letter `b..z`).
pub const MAX_ARITH_STEPS: usize = 25;
/// Values of an [`ArithmeticChain`] lie in `0..ARITH_LIMIT`.
pub const ARITH_LIMIT: u32 = 100;
/// Most planted hops of a [`GraphReachability`] graph (its `2 * hops + 4` nodes are named
/// by the 26 letters).
pub const MAX_REACH_HOPS: usize = 11;

/// One example as text, before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskText {
    /// The question.
    pub question: String,
    /// The reasoning steps, in order.
    pub steps: Vec<String>,
    /// The answer.
    pub answer: String,
}

impl TaskText {
    /// The token ids of every piece ([`text_to_ids`]).
    pub fn to_example(&self) -> ReasoningExample {
        ReasoningExample {
            question: text_to_ids(&self.question),
            steps: self.steps.iter().map(|s| text_to_ids(s)).collect(),
            answer: text_to_ids(&self.answer),
        }
    }
}

/// Byte token ids of `text` (`8 + b` per byte, no prefix, no `<bos>`/`<eos>`).
pub fn text_to_ids(text: &str) -> Vec<u32> {
    encode_bytes(text.as_bytes(), None)
}

/// Text of `ids` for printing: byte ids as (lossy UTF-8) text, special ids by name
/// (`<eos>`), any other id (BPE, media, out of range) as `<id:N>`. Never fails.
pub fn ids_to_text(ids: &[u32]) -> String {
    let mut out = String::new();
    let mut bytes = Vec::new();
    let flush = |bytes: &mut Vec<u8>, out: &mut String| {
        out.push_str(&String::from_utf8_lossy(bytes));
        bytes.clear();
    };
    for &id in ids {
        if let Some(b) = byte_of(id) {
            bytes.push(b);
            continue;
        }
        flush(&mut bytes, &mut out);
        match SpecialToken::from_id(id) {
            Some(s) => out.push_str(s.as_str()),
            None => out.push_str(&format!("<id:{id}>")),
        }
    }
    flush(&mut bytes, &mut out);
    out
}

fn byte_of(id: u32) -> Option<u8> {
    id.checked_sub(BYTE_OFFSET)
        .filter(|&b| b < NUM_BYTE_TOKENS)
        .map(|b| b as u8)
}

/// True when `generated` spells `expected` (both trimmed of ASCII whitespace). `generated`
/// is read up to its first `<eos>` or `<pad>`; any other non-byte id makes it wrong.
pub fn answer_matches(expected: &[u32], generated: &[u32]) -> bool {
    let end = generated
        .iter()
        .position(|&id| id == SpecialToken::Eos.id() || id == SpecialToken::Pad.id())
        .unwrap_or(generated.len());
    let to_bytes = |ids: &[u32]| {
        ids.iter()
            .map(|&id| byte_of(id))
            .collect::<Option<Vec<u8>>>()
    };
    match (to_bytes(expected), to_bytes(&generated[..end])) {
        (Some(e), Some(g)) => e.trim_ascii() == g.trim_ascii(),
        _ => false,
    }
}

/// The random stream of example `index` of a set with `seed` (`tag` separates the tasks).
fn example_rng(seed: u64, tag: u64, index: usize) -> SeededRng {
    let mix = |x: u64| SeededRng::new(x).next_u64();
    SeededRng::new(mix(seed ^ mix(tag ^ mix(index as u64))))
}

/// Arithmetic chains: a start value and `steps` operations, each on the previous variable.
///
/// ```
/// use tritter::paradigm::task::ArithmeticChain;
/// let t = &ArithmeticChain::new(3)?.generate_text(1, 7)[0];
/// assert_eq!(t.steps.len(), 3);
/// assert!(t.question.ends_with("d?"));
/// # Ok::<(), tritter::TritterError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArithmeticChain {
    steps: usize,
}

impl ArithmeticChain {
    /// Chains of `steps` operations, `1..=25`.
    pub fn new(steps: usize) -> Result<Self> {
        if !(1..=MAX_ARITH_STEPS).contains(&steps) {
            return Err(TritterError::argument(
                "arith difficulty (steps)",
                steps,
                format!("in 1..={MAX_ARITH_STEPS}"),
            ));
        }
        Ok(ArithmeticChain { steps })
    }

    /// Operations per chain.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// `n` examples as text.
    pub fn generate_text(&self, n: usize, seed: u64) -> Vec<TaskText> {
        (0..n)
            .map(|i| self.example(&mut example_rng(seed, 1, i)))
            .collect()
    }

    /// `n` examples as token ids.
    pub fn generate(&self, n: usize, seed: u64) -> Vec<ReasoningExample> {
        self.generate_text(n, seed)
            .iter()
            .map(TaskText::to_example)
            .collect()
    }

    fn example(&self, rng: &mut SeededRng) -> TaskText {
        let var = |i: usize| char::from(b'a' + i as u8);
        let mut value = rng.below(10) as u32;
        let mut question = format!("a={value}");
        let mut steps = Vec::with_capacity(self.steps);
        for i in 1..=self.steps {
            let c = 1 + rng.below(9) as u32;
            let m = 2 + rng.below(2) as u32;
            // Operations whose result stays in 0..ARITH_LIMIT; '+' or '-' always qualifies
            // (value + c >= 100 implies value >= 91 > c).
            let mut ops: Vec<(char, u32, u32)> = Vec::with_capacity(3);
            if value + c < ARITH_LIMIT {
                ops.push(('+', c, value + c));
            }
            if value >= c {
                ops.push(('-', c, value - c));
            }
            if value * m < ARITH_LIMIT {
                ops.push(('*', m, value * m));
            }
            let (op, operand, next) = ops[rng.below(ops.len() as u64) as usize];
            question.push_str(&format!("; {}={}{op}{operand}", var(i), var(i - 1)));
            value = next;
            steps.push(format!("{}={value}{STEP_END}", var(i)));
        }
        question.push_str(&format!("; {}?", var(self.steps)));
        TaskText {
            question,
            steps,
            answer: value.to_string(),
        }
    }
}

/// Reachability in a random DAG (ProsQA-like). Graph of `2 * hops + 4` nodes named by
/// distinct random letters, in a hidden topological order; a path of `hops` edges is
/// planted from the source (never among the first two nodes) and each node gets 0 to 2
/// random forward edges. Even examples ask for the path's end (`yes`), odd ones for a node
/// not reachable from the source that has at least one incoming edge (`no`), so neither
/// answer can be read off in-degrees. Extra edges may shorten the path; the steps of a
/// `yes` are a shortest path (BFS, neighbours in topological order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphReachability {
    hops: usize,
}

impl GraphReachability {
    /// Graphs with a planted path of `hops` edges, `1..=11`.
    pub fn new(hops: usize) -> Result<Self> {
        if !(1..=MAX_REACH_HOPS).contains(&hops) {
            return Err(TritterError::argument(
                "reach difficulty (hops)",
                hops,
                format!("in 1..={MAX_REACH_HOPS}"),
            ));
        }
        Ok(GraphReachability { hops })
    }

    /// Planted path length.
    pub fn hops(&self) -> usize {
        self.hops
    }

    /// `n` examples as text (`yes` for even indices, `no` for odd).
    pub fn generate_text(&self, n: usize, seed: u64) -> Vec<TaskText> {
        (0..n)
            .map(|i| self.example(&mut example_rng(seed, 2, i), i % 2 == 0))
            .collect()
    }

    /// `n` examples as token ids.
    pub fn generate(&self, n: usize, seed: u64) -> Vec<ReasoningExample> {
        self.generate_text(n, seed)
            .iter()
            .map(TaskText::to_example)
            .collect()
    }

    fn example(&self, rng: &mut SeededRng, reachable: bool) -> TaskText {
        let nodes = 2 * self.hops + 4;
        // Names: a random permutation of the letters; node p (topological position) is
        // called names[p].
        let mut letters: Vec<u8> = (b'A'..=b'Z').collect();
        shuffle(&mut letters, rng);
        let name = |p: usize| char::from(letters[p]);

        // Path positions: hops + 1 distinct positions from 2..nodes, ascending.
        let mut pool: Vec<usize> = (2..nodes).collect();
        shuffle(&mut pool, rng);
        let mut path: Vec<usize> = pool[..=self.hops].to_vec();
        path.sort_unstable();

        let mut edges = BTreeSet::new();
        for w in path.windows(2) {
            edges.insert((w[0], w[1]));
        }
        for u in 0..nodes - 1 {
            for _ in 0..rng.below(3) {
                let v = u + 1 + rng.below((nodes - 1 - u) as u64) as usize;
                edges.insert((u, v));
            }
        }
        let source = path[0];
        let reach = reachable_from(nodes, &edges, source);
        let target = if reachable {
            path[self.hops]
        } else {
            // Position 1 is never reachable (edges go forward, the source is at >= 2).
            let cands: Vec<usize> = (1..nodes).filter(|&p| reach[p].is_none()).collect();
            let t = cands[rng.below(cands.len() as u64) as usize];
            if !edges.iter().any(|&(_, v)| v == t) {
                // Node 0 is not reachable from the source either, so this keeps t unreachable.
                edges.insert((0, t));
            }
            t
        };

        let mut listed: Vec<(usize, usize)> = edges.iter().copied().collect();
        shuffle(&mut listed, rng);
        let edge_text: Vec<String> = listed
            .iter()
            .map(|&(u, v)| format!("{}>{}", name(u), name(v)))
            .collect();
        let question = format!(
            "edges: {}. is {} reachable from {}?",
            edge_text.join(", "),
            name(target),
            name(source)
        );
        let steps = if reachable {
            let mut hops = Vec::new();
            let mut at = target;
            while at != source {
                let Some(parent) = reach[at] else { break };
                hops.push(format!("{}>{}", name(parent), name(at)));
                at = parent;
            }
            hops.reverse();
            hops
        } else {
            bfs_levels(nodes, &edges, source)
                .into_iter()
                .map(|level| {
                    let mut names: Vec<char> = level.into_iter().map(name).collect();
                    names.sort_unstable();
                    names
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        };
        TaskText {
            question,
            steps: steps.into_iter().map(|s| s + STEP_END).collect(),
            answer: if reachable { "yes" } else { "no" }.to_string(),
        }
    }
}

/// Fisher-Yates with the example's stream.
fn shuffle<T>(v: &mut [T], rng: &mut SeededRng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

fn adjacency(nodes: usize, edges: &BTreeSet<(usize, usize)>) -> Vec<Vec<usize>> {
    let mut adj = vec![Vec::new(); nodes];
    for &(u, v) in edges {
        adj[u].push(v); // BTreeSet order: ascending v per u
    }
    adj
}

/// BFS parents from `source`: `Some(parent)` for reached nodes (`Some(source)` for the
/// source itself), `None` for the rest.
fn reachable_from(
    nodes: usize,
    edges: &BTreeSet<(usize, usize)>,
    source: usize,
) -> Vec<Option<usize>> {
    let adj = adjacency(nodes, edges);
    let mut parent = vec![None; nodes];
    parent[source] = Some(source);
    let mut queue = VecDeque::from([source]);
    while let Some(u) = queue.pop_front() {
        for &v in &adj[u] {
            if parent[v].is_none() {
                parent[v] = Some(u);
                queue.push_back(v);
            }
        }
    }
    parent
}

/// Nodes first reached at BFS depth 1, 2, ... from `source`.
fn bfs_levels(nodes: usize, edges: &BTreeSet<(usize, usize)>, source: usize) -> Vec<Vec<usize>> {
    let adj = adjacency(nodes, edges);
    let mut seen = vec![false; nodes];
    seen[source] = true;
    let mut frontier = vec![source];
    let mut levels = Vec::new();
    loop {
        let mut next = Vec::new();
        for &u in &frontier {
            for &v in &adj[u] {
                if !seen[v] {
                    seen[v] = true;
                    next.push(v);
                }
            }
        }
        if next.is_empty() {
            return levels;
        }
        levels.push(next.clone());
        frontier = next;
    }
}

/// The synthetic tasks by name: `"arith"` ([`ArithmeticChain`]) and `"reach"`
/// ([`GraphReachability`]); the CLI and the evaluation loop pick one by string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// [`ArithmeticChain`]; difficulty = steps.
    Arithmetic,
    /// [`GraphReachability`]; difficulty = planted hops.
    Reachability,
}

impl FromStr for TaskKind {
    type Err = TritterError;

    /// `"arith"` / `"arithmetic"` or `"reach"` / `"reachability"` (any case).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "arith" | "arithmetic" => Ok(TaskKind::Arithmetic),
            "reach" | "reachability" => Ok(TaskKind::Reachability),
            _ => Err(TritterError::argument(
                "task",
                format!("{s:?}"),
                "one of arith, reach",
            )),
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskKind::Arithmetic => "arith",
            TaskKind::Reachability => "reach",
        })
    }
}

impl TaskKind {
    /// Largest accepted difficulty (25 steps, 11 hops).
    pub fn max_difficulty(self) -> usize {
        match self {
            TaskKind::Arithmetic => MAX_ARITH_STEPS,
            TaskKind::Reachability => MAX_REACH_HOPS,
        }
    }

    /// `n` examples as text, deterministic per `(seed, difficulty)`. Errors on a difficulty
    /// outside `1..=max_difficulty()`.
    pub fn generate_text(self, n: usize, seed: u64, difficulty: usize) -> Result<Vec<TaskText>> {
        Ok(match self {
            TaskKind::Arithmetic => ArithmeticChain::new(difficulty)?.generate_text(n, seed),
            TaskKind::Reachability => GraphReachability::new(difficulty)?.generate_text(n, seed),
        })
    }

    /// `n` examples as token ids (see the module docs for the token convention).
    pub fn generate(self, n: usize, seed: u64, difficulty: usize) -> Result<Vec<ReasoningExample>> {
        Ok(self
            .generate_text(n, seed, difficulty)?
            .iter()
            .map(TaskText::to_example)
            .collect())
    }

    /// True when `generated_answer` is the example's answer ([`answer_matches`]: exact
    /// match after trimming, read up to `<eos>`).
    pub fn check(self, example: &ReasoningExample, generated_answer: &[u32]) -> bool {
        answer_matches(&example.answer, generated_answer)
    }
}
