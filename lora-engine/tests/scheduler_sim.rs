//! The scheduler under a simulated clock (one tick per step) with a fake deterministic "model": the next
//! token is a hash of the adapter and of every token the sequence's KV holds, read back through its page
//! table from a simulated paged KV cache. So a wrong page table, position, chunk or recompute changes the
//! tokens, and every request's tokens are checked against an oracle that runs the same hash on the request
//! alone. Unit tests for each rule, then property tests (token budget, pages, slots, exactly-once
//! completion, preemption storms, adapters over the slot count, the starvation bound).

use std::collections::{BTreeMap, HashMap, HashSet};

use lora_engine::scheduler::{Scheduler, SchedulerConfig, SeqRequest};
use lora_engine::FinishReason;
use lora_slots::SlotManager;
use proptest::prelude::*;

const VOCAB: u64 = 50;
const STOP: u32 = 0;

fn mix(mut z: u64) -> u64 {
    lora_model::sampling::splitmix64(&mut z)
}

/// The fake model: next token after `ctx` under `adapter`.
fn next_token(adapter: Option<u32>, ctx: &[u32]) -> u32 {
    let mut h = mix(adapter.map_or(u64::MAX, u64::from));
    for &t in ctx {
        h = mix(h ^ u64::from(t));
    }
    (h % VOCAB) as u32
}

/// What the request yields alone.
fn oracle(req: &SeqRequest) -> (Vec<u32>, FinishReason) {
    let mut ctx = req.prompt.clone();
    let mut out = Vec::new();
    loop {
        let t = next_token(req.adapter, &ctx);
        ctx.push(t);
        out.push(t);
        if req.stop_ids.contains(&t) {
            return (out, FinishReason::Stop);
        }
        if out.len() == req.max_tokens as usize {
            return (out, FinishReason::Length);
        }
    }
}

#[derive(Debug, Default)]
struct SimResult {
    tokens: HashMap<u64, Vec<u32>>,
    finished: HashMap<u64, FinishReason>,
    admitted_step: HashMap<u64, u64>,
    preemptions: u64,
    steps: u64,
    /// Longest run of steps one request spent as the oldest waiting request.
    longest_head: u64,
}

/// Runs `arrivals` (step, request) through a scheduler with `num_slots` slots until all finish (or
/// `max_steps`), checking every step's invariants. Err = a violated invariant.
fn simulate(
    cfg: SchedulerConfig,
    num_slots: usize,
    arrivals: Vec<(u64, SeqRequest)>,
    max_steps: u64,
) -> Result<SimResult, String> {
    let page_size = cfg.page_size as usize;
    let budget = cfg.max_num_batched_tokens;
    let mut sched = Scheduler::new(cfg.clone()).map_err(|e| e.to_string())?;
    let mut slots = SlotManager::<u32>::new(num_slots).map_err(|e| e.to_string())?;
    let mut kv: HashMap<u32, Vec<Option<u32>>> = HashMap::new();
    let mut pending: BTreeMap<u64, Vec<SeqRequest>> = BTreeMap::new();
    let total = arrivals.len();
    for (step, r) in arrivals {
        pending.entry(step).or_default().push(r);
    }
    let mut res = SimResult::default();
    let mut head: Option<(u64, u64)> = None; // (id, since step)
    for now in 0..max_steps {
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > now {
                break;
            }
            for r in entry.remove() {
                sched.add(r).map_err(|e| e.to_string())?;
            }
        }
        if res.finished.len() == total {
            break;
        }
        let plan = sched.schedule(&slots, &|_| true);
        res.steps = plan.step;
        for &id in &plan.admitted {
            res.admitted_step.entry(id).or_insert(plan.step);
        }
        // Token budget.
        if plan.num_tokens() > budget {
            return Err(format!("step {}: {} tokens over the budget {budget}", plan.step, plan.num_tokens()));
        }
        // Pages: disjoint across live sequences, allocated, counted.
        let mut seen = HashSet::new();
        for &id in sched.running_ids().iter().chain(sched.waiting_ids()) {
            for &p in sched.page_table(id).unwrap_or(&[]) {
                if !seen.insert(p) || !sched.pages().is_allocated(p) {
                    return Err(format!("step {}: page {p} double-allocated or not allocated", plan.step));
                }
            }
        }
        if seen.len() as u32 != sched.pages().used() {
            return Err(format!("step {}: {} pages in tables, {} used", plan.step, seen.len(), sched.pages().used()));
        }
        if sched.num_running() > cfg.max_num_seqs {
            return Err(format!("step {}: {} running > max_num_seqs", plan.step, sched.num_running()));
        }
        // Slots: the step's adapters fit.
        let batch: Vec<Option<u32>> = plan.seqs.iter().map(|p| p.adapter).collect();
        slots.assign(&batch).map_err(|e| format!("step {}: slots refused the batch: {e}", plan.step))?;
        // The fake model over the simulated KV.
        let mut sampled = Vec::new();
        for p in &plan.seqs {
            let end = p.start_pos as usize + p.tokens.len();
            if p.pages.len() * page_size < end {
                return Err(format!(
                    "step {}: pages of {} cover {} < {end}",
                    plan.step,
                    p.id,
                    p.pages.len() * page_size
                ));
            }
            for (i, &t) in p.tokens.iter().enumerate() {
                let pos = p.start_pos as usize + i;
                kv.entry(p.pages[pos / page_size]).or_insert_with(|| vec![None; page_size])[pos % page_size] = Some(t);
            }
            let ctx: Option<Vec<u32>> =
                (0..end).map(|pos| kv.get(&p.pages[pos / page_size]).and_then(|pg| pg[pos % page_size])).collect();
            let ctx = ctx.ok_or_else(|| format!("step {}: {} reads an unwritten position", plan.step, p.id))?;
            sampled.push(p.sample_draw.map(|_| next_token(p.adapter, &ctx)));
        }
        for out in sched.commit(&plan, &sampled) {
            let toks = res.tokens.entry(out.id).or_default();
            toks.push(out.token);
            if toks.len() as u32 != out.completion_tokens {
                return Err(format!(
                    "{}: {} tokens delivered, outcome says {}",
                    out.id,
                    toks.len(),
                    out.completion_tokens
                ));
            }
            if let Some(reason) = out.finish {
                if res.finished.insert(out.id, reason).is_some() {
                    return Err(format!("{} finished twice", out.id));
                }
            }
        }
        // Head-of-queue tracking for the starvation bound.
        let now_head = sched.waiting_ids().first().copied();
        head = match (head, now_head) {
            (Some((h, since)), Some(n)) if h == n => {
                res.longest_head = res.longest_head.max(plan.step - since);
                Some((h, since))
            }
            (_, Some(n)) => Some((n, plan.step)),
            (_, None) => None,
        };
    }
    res.preemptions = sched.counters().preemptions;
    if sched.pages().used() != 0 && res.finished.len() == total {
        return Err(format!("{} pages still used after every request finished", sched.pages().used()));
    }
    Ok(res)
}

fn req(id: u64, prompt_len: usize, adapter: Option<u32>, max_tokens: u32) -> SeqRequest {
    let prompt = (0..prompt_len).map(|i| 1 + ((id as usize * 7 + i * 3) % (VOCAB as usize - 1)) as u32).collect();
    SeqRequest { id, prompt, adapter, max_tokens, stop_ids: vec![STOP] }
}

fn cfg(max_num_seqs: usize, budget: usize, num_pages: u32, page_size: u32) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: budget,
        max_model_len: 64,
        num_pages,
        page_size,
        starvation_steps: 8,
    }
}

/// Every request finished exactly once with the oracle's tokens and reason.
fn check_all(reqs: &[SeqRequest], res: &SimResult) -> Result<(), String> {
    for r in reqs {
        let (want, reason) = oracle(r);
        let got = res.tokens.get(&r.id).cloned().unwrap_or_default();
        if got != want || res.finished.get(&r.id) != Some(&reason) {
            return Err(format!(
                "request {}: got {got:?} {:?}, want {want:?} {reason:?}",
                r.id,
                res.finished.get(&r.id)
            ));
        }
    }
    Ok(())
}

#[test]
fn chunked_prefill_splits_a_prompt_under_the_budget() {
    let mut s = Scheduler::new(cfg(4, 4, 16, 4)).unwrap();
    s.add(req(1, 10, None, 3)).unwrap();
    let slots = SlotManager::<u32>::new(1).unwrap();
    let sizes: Vec<(u32, usize, bool)> = (0..3)
        .map(|_| {
            let plan = s.schedule(&slots, &|_| true);
            let p = &plan.seqs[0];
            let sampled: Vec<Option<u32>> = plan.seqs.iter().map(|p| p.sample_draw.map(|_| 5)).collect();
            s.commit(&plan, &sampled);
            (p.start_pos, p.tokens.len(), p.sample_draw.is_some())
        })
        .collect();
    assert_eq!(sizes, vec![(0, 4, false), (4, 4, false), (8, 2, true)]);
    let plan = s.schedule(&slots, &|_| true);
    assert_eq!((plan.seqs[0].start_pos, plan.seqs[0].tokens.clone(), plan.seqs[0].sample_draw), (10, vec![5], Some(1)));
}

#[test]
fn decodes_run_before_prefill_chunks() {
    let reqs = [req(1, 3, None, 6)];
    let mut s = Scheduler::new(cfg(4, 5, 32, 4)).unwrap();
    let slots = SlotManager::<u32>::new(1).unwrap();
    s.add(reqs[0].clone()).unwrap();
    let plan = s.schedule(&slots, &|_| true);
    s.commit(&plan, &[Some(7)]);
    s.add(req(2, 30, None, 2)).unwrap();
    let plan = s.schedule(&slots, &|_| true);
    let shape: Vec<(u64, usize)> = plan.seqs.iter().map(|p| (p.id, p.tokens.len())).collect();
    assert_eq!(shape, vec![(1, 1), (2, 4)], "the decode first, the new prompt fills the remaining budget");
}

#[test]
fn mixed_workload_matches_requests_run_alone() {
    let reqs: Vec<SeqRequest> = (0..12)
        .map(|i| req(i, 3 + (i as usize * 5) % 17, [None, Some(1), Some(2)][i as usize % 3], 4 + (i as u32 % 9)))
        .collect();
    let arrivals = reqs.iter().enumerate().map(|(i, r)| (i as u64 / 3, r.clone())).collect();
    let res = simulate(cfg(4, 8, 64, 4), 2, arrivals, 2000).unwrap();
    check_all(&reqs, &res).unwrap();
}

#[test]
fn preemption_by_recompute_keeps_tokens() {
    // 10 pages of 4 tokens: three requests growing to ~30 tokens each cannot all stay.
    let reqs: Vec<SeqRequest> =
        (0..3).map(|i| SeqRequest { stop_ids: vec![], ..req(i, 8, Some(i as u32 % 2), 22) }).collect();
    let arrivals = reqs.iter().map(|r| (0, r.clone())).collect();
    let res = simulate(SchedulerConfig { max_model_len: 40, ..cfg(3, 16, 10, 4) }, 2, arrivals, 2000).unwrap();
    assert!(res.preemptions > 0, "the workload must preempt");
    check_all(&reqs, &res).unwrap();
}

#[test]
fn an_adapter_over_the_slot_count_waits_then_completes() {
    let reqs = vec![req(1, 4, Some(1), 10), req(2, 4, Some(2), 5), req(3, 4, None, 5)];
    let arrivals = reqs.iter().map(|r| (0, r.clone())).collect();
    let res = simulate(cfg(4, 16, 32, 4), 1, arrivals, 500).unwrap();
    check_all(&reqs, &res).unwrap();
    assert_eq!(res.admitted_step[&1], 1);
    assert_eq!(res.admitted_step[&3], 1, "a base request passes the blocked one");
    assert!(res.admitted_step[&2] > 1, "adapter 2 waits for adapter 1's slot");
}

/// One slot, a request for adapter 1 arriving every step, one request for adapter 2.
fn starvation_workload(starvation_steps: u64) -> (SchedulerConfig, Vec<(u64, SeqRequest)>) {
    let mut arrivals: Vec<(u64, SeqRequest)> =
        (0..400).map(|i| (i, SeqRequest { stop_ids: vec![], ..req(100 + i, 4, Some(1), 6) })).collect();
    arrivals.push((3, SeqRequest { stop_ids: vec![], ..req(1, 4, Some(2), 6) }));
    let c = SchedulerConfig { starvation_steps, max_model_len: 16, ..cfg(4, 8, 64, 4) };
    (c, arrivals)
}

#[test]
fn aging_bounds_the_wait_of_a_blocked_adapter() {
    let (c, arrivals) = starvation_workload(8);
    let bound = c.starvation_steps + 2 * c.max_model_len as u64;
    let res = simulate(c, 1, arrivals, 400).unwrap();
    let waited = res.admitted_step[&1] - 4; // arrived before step 4
    assert!(waited <= bound, "adapter 2 waited {waited} steps > bound {bound}");
    // Without aging the same workload starves it for as long as adapter 1's stream lasts.
    let (c, arrivals) = starvation_workload(u64::MAX);
    let res = simulate(c, 1, arrivals, 300).unwrap();
    assert!(!res.admitted_step.contains_key(&1), "without aging adapter 2 would not have starved: the test is vacuous");
}

#[test]
fn abort_frees_pages_and_config_is_validated() {
    let mut s = Scheduler::new(cfg(4, 8, 16, 4)).unwrap();
    let slots = SlotManager::<u32>::new(1).unwrap();
    s.add(req(1, 10, None, 5)).unwrap();
    let plan = s.schedule(&slots, &|_| true);
    assert!(s.pages().used() > 0);
    assert_eq!(s.remove(1), Some((10, 0)));
    assert_eq!(s.pages().used(), 0);
    assert!(s.commit(&plan, &[None]).is_empty(), "a removed sequence's results are dropped");
    assert!(s.add(req(2, 0, None, 1)).is_err());
    assert!(s.add(req(3, 60, None, 10)).is_err(), "prompt + max_tokens over max_model_len");
    assert!(Scheduler::new(cfg(8, 4, 16, 4)).is_err(), "budget below max_num_seqs");
    assert!(Scheduler::new(cfg(4, 8, 2, 4)).is_err(), "KV cache smaller than max_model_len");
}

#[test]
fn unready_adapters_wait_without_blocking_others() {
    let mut s = Scheduler::new(cfg(4, 8, 32, 4)).unwrap();
    let slots = SlotManager::<u32>::new(2).unwrap();
    s.add(req(1, 4, Some(7), 2)).unwrap();
    s.add(req(2, 4, None, 2)).unwrap();
    let plan = s.schedule(&slots, &|a| a != 7);
    assert_eq!(plan.admitted, vec![2]);
    let plan = s.schedule(&slots, &|_| true);
    assert!(plan.admitted.contains(&1));
}

fn workload() -> impl Strategy<Value = (SchedulerConfig, usize, Vec<(u64, SeqRequest)>)> {
    (1usize..5, 0usize..8, 6u32..30, prop::sample::select(vec![2u32, 4, 8]), 1usize..4, 0usize..5, 1u64..12)
        .prop_flat_map(|(seqs, extra_budget, pages, page_size, slots, adapters, starvation)| {
            let c = SchedulerConfig {
                max_num_seqs: seqs,
                max_num_batched_tokens: seqs + extra_budget,
                max_model_len: (pages * page_size).min(40) as usize,
                num_pages: pages,
                page_size,
                starvation_steps: starvation,
            };
            let max_len = c.max_model_len;
            let one = (0u64..20, 1usize..20, prop::option::of(0..adapters.max(1) as u32), 1u32..16, any::<bool>());
            (Just(c), Just(slots), prop::collection::vec(one, 1..14)).prop_map(move |(c, slots, rs)| {
                let arrivals = rs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (at, plen, ad, mt, stops))| {
                        let plen = plen.min(max_len - 1);
                        let mt = mt.min((max_len - plen) as u32);
                        let ad = if adapters == 0 { None } else { ad };
                        let r = SeqRequest {
                            stop_ids: if stops { vec![STOP] } else { vec![] },
                            ..req(i as u64, plen, ad, mt)
                        };
                        (at, r)
                    })
                    .collect();
                (c, slots, arrivals)
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Budget, pages and slots hold every step; every request finishes exactly once with its own tokens,
    /// under preemption storms (few pages) and more adapters than slots.
    #[test]
    fn every_request_finishes_once_with_its_tokens((c, slots, arrivals) in workload()) {
        let reqs: Vec<SeqRequest> = arrivals.iter().map(|(_, r)| r.clone()).collect();
        let res = simulate(c, slots, arrivals, 5000).map_err(TestCaseError::fail)?;
        check_all(&reqs, &res).map_err(TestCaseError::fail)?;
    }

    /// With pages for max_num_seqs full-length sequences (no preemption), the oldest waiting request
    /// is admitted within starvation_steps + 2 * max_model_len steps of becoming the oldest.
    #[test]
    fn the_oldest_waiting_request_is_admitted_within_the_bound((c, slots, arrivals) in workload()) {
        let pages = (c.max_num_seqs * c.max_model_len).div_ceil(c.page_size as usize) as u32;
        let c = SchedulerConfig { num_pages: pages, ..c };
        let bound = c.starvation_steps + 2 * c.max_model_len as u64;
        let res = simulate(c, slots, arrivals, 5000).map_err(TestCaseError::fail)?;
        prop_assert_eq!(res.preemptions, 0);
        prop_assert!(res.longest_head <= bound, "head waited {} > {}", res.longest_head, bound);
    }
}
