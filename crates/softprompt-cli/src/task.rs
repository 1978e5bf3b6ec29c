//! The task a subcommand works on: from its flags, else from what a stored prompt recorded,
//! else the defaults.

use anyhow::Result;
use softprompt::train::data::Template;
use softprompt::train::{Task, Verbalizer};
use softprompt::StoredPrompt;

use crate::args::{TaskArgs, TaskKind};

const DEFAULT_TEMPLATE: &str = "Review: {text}\nSentiment:";
const DEFAULT_LABELS: &str = "negative= negative,positive= positive";

/// The task from the flags, falling back to what a stored prompt recorded, then to defaults.
pub(crate) fn task_of(t: &TaskArgs, stored: Option<&StoredPrompt>) -> Result<Task> {
    let prov = stored.and_then(|s| s.config.softprompt.as_ref());
    let template = t
        .template
        .clone()
        .or_else(|| prov.and_then(|p| p.template.clone()))
        .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    let template = Template::new(template)?;
    Ok(match t.task {
        TaskKind::Generation => Task::Generation { template },
        TaskKind::Classification => {
            let verbalizer = match (&t.labels, prov.filter(|p| !p.labels.is_empty())) {
                (Some(spec), _) => Verbalizer::parse(spec)?,
                (None, Some(p)) => Verbalizer::new(p.labels.clone())?,
                (None, None) => Verbalizer::parse(DEFAULT_LABELS)?,
            };
            Task::Classification {
                template,
                verbalizer,
            }
        }
    })
}
