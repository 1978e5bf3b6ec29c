//! Faults while saving: writers killed at random points, concurrent writers and readers, one file
//! replaced alone, stale temporary folders, reproducible bytes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use softprompt_core::{Architecture, BackboneSpec, PromptConfig, SoftPrompt, StoredPrompt};
use softprompt_store::{read_prompt_dir, write_prompt_dir, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

fn spec(d: usize) -> BackboneSpec {
    BackboneSpec {
        architecture: Architecture::llama(),
        hidden_size: d,
        vocab_size: 320,
        num_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        fingerprint: format!("fp-{d}"),
        name: "tiny".into(),
    }
}

/// Two prompts that differ in every part a mix could show: shape, values, template, labels,
/// fingerprint.
fn version(which: usize) -> StoredPrompt {
    let (n, d, x) = if which == 0 {
        (4, 16, 0.25)
    } else {
        (7, 8, -0.5)
    };
    let prompt = SoftPrompt::new(n, d, vec![x; n * d]).unwrap();
    let mut config = PromptConfig::for_backbone(&prompt, &spec(d));
    let prov = config.softprompt.as_mut().unwrap();
    prov.template = Some(format!("template {which}: {{text}}"));
    prov.labels = vec![(format!("label-{which}"), format!(" word{which}"))];
    StoredPrompt {
        prompt,
        config,
        metadata: [("which".to_string(), which.to_string())].into(),
    }
}

/// Errors unless the folder holds exactly one of the two versions, complete.
fn whole(dir: &Path) -> Result<usize, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt
        .block_on(read_prompt_dir(dir))
        .map_err(|e| e.to_string())?;
    let which: usize = s.metadata["which"].parse().unwrap();
    let want = version(which);
    if s.prompt != want.prompt {
        return Err(format!("values of version {which} differ"));
    }
    let (a, b) = (
        s.config.softprompt.unwrap(),
        want.config.softprompt.unwrap(),
    );
    if (a.template, a.labels, a.backbone_fingerprint)
        != (b.template, b.labels, b.backbone_fingerprint)
    {
        return Err(format!("config of version {which} mixed"));
    }
    Ok(which)
}

/// When run as a child (`SOFTPROMPT_FAULT_WRITER=dir`), saves the two versions in turn forever.
#[test]
fn writer_child() {
    let Ok(dir) = std::env::var("SOFTPROMPT_FAULT_WRITER") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for i in 0.. {
        rt.block_on(write_prompt_dir(Path::new(&dir), &version(i % 2)))
            .unwrap();
    }
}

/// When run as a child (`SOFTPROMPT_FULL_DISK=dir`, `dir` a 64 KiB tmpfs): a save that runs out
/// of space fails with the OS's error and leaves the previous prompt and no temporary entry; the
/// next save that fits succeeds.
#[test]
fn full_disk_child() {
    let Ok(root) = std::env::var("SOFTPROMPT_FULL_DISK") else {
        return;
    };
    let root = Path::new(&root);
    let dir = root.join("prompt");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(write_prompt_dir(&dir, &version(0))).unwrap();
    // 40 × 512 f32 = 80 KiB: more than the whole file system
    let big = SoftPrompt::new(40, 512, vec![0.5; 40 * 512]).unwrap();
    let huge = StoredPrompt {
        config: PromptConfig::for_backbone(&big, &spec(512)),
        prompt: big,
        metadata: Default::default(),
    };
    let err = rt.block_on(write_prompt_dir(&dir, &huge)).unwrap_err();
    let enospc = match &err {
        softprompt_core::Error::Io { source, .. } => source.raw_os_error() == Some(28),
        _ => false,
    };
    assert!(enospc, "expected ENOSPC, got: {err}");
    assert_eq!(whole(&dir), Ok(0), "the previous prompt survives");
    let left: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "prompt")
        .collect();
    assert!(left.is_empty(), "temporary entries left: {left:?}");
    rt.block_on(write_prompt_dir(&dir, &version(1))).unwrap();
    assert_eq!(whole(&dir), Ok(1));
    println!("FULL-DISK-OK: {err}");
}

#[test]
fn a_full_disk_fails_the_save_and_loses_nothing() {
    // a private mount namespace (as root, or through a user namespace) with a 64 KiB tmpfs
    let mount = tempfile::tempdir().unwrap();
    let script = r#"mount -t tmpfs -o size=64k tmpfs "$SOFTPROMPT_FULL_DISK" || exit 77
exec "$0" --exact full_disk_child --nocapture --test-threads 1"#;
    let run = |unshare: &[&str]| {
        Command::new("unshare")
            .args(unshare)
            .args(["sh", "-c", script])
            .arg(std::env::current_exe().unwrap())
            .env("SOFTPROMPT_FULL_DISK", mount.path())
            .output()
    };
    let out = match run(&["-m"]) {
        Ok(o) if o.status.code() == Some(77) => run(&["-rm"]),
        other => other,
    };
    let required = std::env::var("SOFTPROMPT_REQUIRE_FAULTS").is_ok_and(|v| v == "1");
    let out = match out {
        Ok(o) if o.status.code() != Some(77) => o,
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(!required, "no tmpfs for the full-disk test: {why}");
            eprintln!("skipped: cannot mount a tmpfs here ({why})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("FULL-DISK-OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writers_killed_at_random_points_never_leave_a_mixed_or_missing_folder() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("prompt");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(write_prompt_dir(&dir, &version(0))).unwrap();
    let mut seen = [0usize; 2];
    for round in 0..12u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "writer_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("SOFTPROMPT_FAULT_WRITER", &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // SIGKILL at a different point of the save loop each round
        std::thread::sleep(Duration::from_millis(40 + 17 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        match whole(&dir) {
            Ok(w) => seen[w] += 1,
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    // the killed writers' temporary folders are cleaned by the next save
    rt.block_on(write_prompt_dir(&dir, &version(1))).unwrap();
    let left: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "prompt")
        .collect();
    assert!(left.is_empty(), "stale entries left: {left:?}");
    assert_eq!(whole(&dir), Ok(1));
    eprintln!("versions found after kills: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_readers_see_whole_prompts_only() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("prompt");
    write_prompt_dir(&dir, &version(0)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let dir = dir.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                write_prompt_dir(&dir, &version((w + i) % 2)).await.unwrap();
            }
        }));
    }
    let reader = {
        let dir = dir.clone();
        // its own thread and runtime, outside this one
        std::thread::spawn(move || {
            let mut reads = 0;
            for _ in 0..300 {
                whole(&dir).unwrap();
                reads += 1;
            }
            reads
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let reads = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(reads, 300);
    let last = read_prompt_dir(&dir).await.unwrap();
    assert!(last.prompt == version(0).prompt || last.prompt == version(1).prompt);
    let temps = std::fs::read_dir(root.path()).unwrap().count();
    assert_eq!(temps, 1, "only the prompt folder remains");
}

#[tokio::test]
async fn weights_replaced_alone_are_refused_not_mixed() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    write_prompt_dir(&a, &version(0)).await.unwrap();
    write_prompt_dir(&b, &version(1)).await.unwrap();
    // the state a two-rename save left when killed between its renames
    std::fs::copy(b.join(ADAPTER_WEIGHTS), a.join(ADAPTER_WEIGHTS)).unwrap();
    let err = read_prompt_dir(&a).await.unwrap_err();
    assert!(err.to_string().contains("weights_sha256"), "{err}");
    // a PEFT folder (no softprompt provenance) is read as it is
    let mut peft = version(0);
    peft.config.softprompt = None;
    write_prompt_dir(&a, &peft).await.unwrap();
    assert_eq!(read_prompt_dir(&a).await.unwrap().prompt, peft.prompt);
}

#[tokio::test]
async fn equal_prompts_make_equal_files_and_live_writers_temp_folders_are_kept() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    write_prompt_dir(&a, &version(1)).await.unwrap();
    write_prompt_dir(&b, &version(1)).await.unwrap();
    for file in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        assert_eq!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
            "{file} differs between two saves of one prompt"
        );
    }
    // a temporary folder of a process that no longer runs goes; one of a live process stays
    let dead = root.path().join(".a.2147483000.1.tmp");
    let live = root.path().join(format!(".a.{}.1.tmp", std::process::id()));
    std::fs::create_dir(&dead).unwrap();
    std::fs::create_dir(&live).unwrap();
    write_prompt_dir(&a, &version(0)).await.unwrap();
    assert!(!dead.exists());
    assert!(live.exists());
    // and a file where the folder should be is refused, untouched
    let file = root.path().join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(write_prompt_dir(&file, &version(0)).await.is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[tokio::test]
async fn what_else_the_folder_holds_stays_with_the_prompt() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("p");
    write_prompt_dir(&dir, &version(0)).await.unwrap();
    std::fs::create_dir(dir.join("run")).unwrap();
    std::fs::write(dir.join("run").join("checkpoint.json"), b"{}").unwrap();
    std::fs::write(dir.join("README.md"), b"notes").unwrap();
    write_prompt_dir(&dir, &version(1)).await.unwrap();
    assert_eq!(
        std::fs::read(dir.join("run/checkpoint.json")).unwrap(),
        b"{}"
    );
    assert_eq!(std::fs::read(dir.join("README.md")).unwrap(), b"notes");
    // a writer killed between its swap and the carry-over left the run directory in its old
    // folder: the next save hands it back
    let stale = root.path().join(".p.2147483000.7.tmp");
    std::fs::create_dir(&stale).unwrap();
    std::fs::rename(dir.join("run"), stale.join("run")).unwrap();
    write_prompt_dir(&dir, &version(0)).await.unwrap();
    assert_eq!(
        std::fs::read(dir.join("run/checkpoint.json")).unwrap(),
        b"{}"
    );
    assert!(!stale.exists());
    assert_eq!(whole_async(&dir).await, 0);
}

async fn whole_async(dir: &Path) -> usize {
    let d = dir.to_path_buf();
    std::thread::spawn(move || whole(&d).unwrap())
        .join()
        .unwrap()
}
