//! The task a subcommand works on: from its flags, else from what a stored prompt recorded;
//! `train` and `eval` need one of the two (no task's template is a good guess for another's),
//! `bench` runs its own sentiment task.

use anyhow::Result;
use softprompt::train::data::Template;
use softprompt::train::{Task, Verbalizer};
use softprompt::StoredPrompt;

use crate::args::{TaskArgs, TaskKind};

const DEFAULT_TEMPLATE: &str = "Review: {text}\nSentiment:";
const DEFAULT_LABELS: &str = "negative= negative,positive= positive";

/// Whether a missing template or label set falls back to the sentiment benchmark's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Defaults {
    /// Refuse: the user's data decides (train, eval).
    Refuse,
    /// The benchmark's sentiment task (bench).
    Sentiment,
}

/// The task from the flags, falling back to what a stored prompt recorded.
pub(crate) fn task_of(
    t: &TaskArgs,
    stored: Option<&StoredPrompt>,
    defaults: Defaults,
) -> Result<Task> {
    let prov = stored.and_then(|s| s.config.softprompt.as_ref());
    let template = match (t.template.clone(), prov.and_then(|p| p.template.clone())) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) if defaults == Defaults::Sentiment => DEFAULT_TEMPLATE.to_string(),
        (None, None) => anyhow::bail!(
            "no input template: pass --template with one {{text}} (or {{input}}) placeholder, \
             e.g. --template $'Review: {{text}}\\nSentiment:' (a prompt saved by softprompt \
             records its own)"
        ),
    };
    let template = Template::new(template)?;
    Ok(match t.task {
        TaskKind::Generation => Task::Generation { template },
        TaskKind::ImageClassification => anyhow::bail!(
            "--task image-classification trains on --images with a vision transformer: \
             `softprompt train --task image-classification --images fashion-mnist --model vit.onnx \
             --method vpt-shallow`"
        ),
        TaskKind::Classification => {
            let verbalizer = match (&t.labels, prov.filter(|p| !p.labels.is_empty())) {
                (Some(spec), _) => Verbalizer::parse(spec)?,
                (None, Some(p)) => Verbalizer::new(p.labels.clone())?,
                (None, None) if defaults == Defaults::Sentiment => {
                    Verbalizer::parse(DEFAULT_LABELS)?
                }
                (None, None) => anyhow::bail!(
                    "no labels: pass --labels as label=word pairs, e.g. \
                     --labels 'negative= negative,positive= positive' (a prompt saved by \
                     softprompt records its own)"
                ),
            };
            Task::Classification {
                template,
                verbalizer,
            }
        }
    })
}
