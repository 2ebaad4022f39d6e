//! `coordinator decay`: a cooldown that starts at the next step boundary
//! and becomes the run's end — the segment `--resume --extend-steps S+K
//! --decay SHAPE` would append, applied to the running job.

use stride_job::checkpoint::HistoryEvent;
use stride_job::schedule::{Cooldown, Schedule};
use stride_proto::v1::DecayResponse;
use tokio::sync::oneshot;

use super::Driver;

/// A decay request waiting for the next step boundary: steps of cooldown,
/// its shape, and where to answer.
#[derive(Debug)]
pub struct DecayRequest {
    pub over: u64,
    pub shape: Cooldown,
    pub reply: oneshot::Sender<Result<DecayResponse, tonic::Status>>,
}

/// The segment in force at `step`, for `coordinator status`; notes a
/// decay that was requested while the job ran.
pub fn describe_segment(schedule: &Schedule, step: u64, history: &[HistoryEvent]) -> String {
    let Some(seg) = schedule.segment_at(step) else {
        return String::new();
    };
    let mut text = format!(
        "{} from step {} to {} (lr {:.3e} → {:.3e})",
        seg.kind.name(),
        seg.start_step,
        seg.end_step,
        seg.start_lr,
        seg.end_lr
    );
    if history
        .iter()
        .any(|h| h.event == "decay" && h.step == seg.start_step)
    {
        text.push_str(&format!(", decay requested at step {}", seg.start_step));
    }
    text
}

impl Driver {
    /// Applies a waiting decay request at this step boundary and answers it.
    pub(super) fn answer_decay(&mut self) {
        if let Some(r) = self.boundary.decay.take() {
            let _ = r.reply.send(self.apply_decay(r.over, r.shape));
        }
    }

    /// From this step boundary S, a cooldown of `shape` to step S + `over`,
    /// which becomes the run's end. Refused when it would end after the
    /// run's end (decay only shortens a run) or when a cooldown is already
    /// in force.
    fn apply_decay(&mut self, over: u64, shape: Cooldown) -> Result<DecayResponse, tonic::Status> {
        let s = self.step;
        let schedule = &self.course.schedule;
        let old_max = schedule.max_steps();
        let end = s.saturating_add(over);
        if end > old_max {
            return Err(tonic::Status::failed_precondition(format!(
                "a cooldown over {over} steps from step {s} would end at step {end}, after the run's end at step {old_max}: decay only shortens a run (lengthen one with --resume … --extend-steps N --decay {})",
                shape.name()
            )));
        }
        if let Some(seg) = schedule.segment_at(s).filter(|seg| seg.is_cooldown()) {
            return Err(tonic::Status::failed_precondition(format!(
                "the job is already cooling down ({} from step {} to {}, lr {:.3e} → {:.3e}): a decay cannot start inside another",
                seg.kind.name(),
                seg.start_step,
                seg.end_step,
                seg.start_lr,
                seg.end_lr
            )));
        }
        let c = &self.course.config.train;
        let floor = c.lr * c.min_lr_ratio;
        let new = schedule
            .extend(s, end, floor, shape)
            .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
        let Some(seg) = new.segments.last().copied() else {
            return Err(tonic::Status::internal("the extended schedule is empty"));
        };
        let detail = format!(
            "decay requested: {} cooldown over steps {s}..{end} (lr {:.3e} → {:.3e}); max_steps {old_max} → {end}",
            shape.name(),
            seg.start_lr,
            seg.end_lr
        );
        tracing::warn!("{detail}");
        self.course.schedule = new;
        self.course.history.push(HistoryEvent {
            step: s,
            event: "decay".into(),
            detail: detail.clone(),
        });
        let line = serde_json::json!({
            "event": "decay",
            "step": s,
            "shape": shape.name(),
            "previous_max_steps": old_max,
            "max_steps": end,
            "start_lr": seg.start_lr,
            "end_lr": seg.end_lr,
        });
        if let Err(e) = self.run.write_line(&line) {
            tracing::warn!("cannot record the decay in metrics.jsonl: {e:#}");
        }
        if let Ok(mut st) = self.shared.status.lock() {
            st.max_steps = end;
            st.schedule = describe_segment(&self.course.schedule, s, &self.course.history);
        }
        Ok(DecayResponse {
            start_step: s,
            max_steps: end,
            start_lr: seg.start_lr,
            end_lr: seg.end_lr,
        })
    }
}
