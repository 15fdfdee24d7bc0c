//! The adapter sink. Factor bytes stream into a staging folder inside OUT as each tensor
//! finishes (memory does not grow with the model); `commit` writes the safetensors header,
//! then renames the model file, the report and — last — adapter_config.json into OUT, so a
//! reader that sees the config sees a complete adapter. Tensors may arrive in any order (from
//! several workers); the file lists them by the caller's order key, so its bytes do not depend
//! on which worker finished first. If the writer is dropped without
//! committing (an error, a panic), the staging folder is removed and OUT holds no adapter.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{CONFIG_FILE, MODEL_FILE, REPORT_FILE};
use crate::checkpoint::writer::{header_bytes, HeaderEntry};
use crate::error::{Error, Result};

pub struct AdapterWriter {
    out: PathBuf,
    staging: PathBuf,
    data_path: PathBuf,
    data: Option<BufWriter<File>>,
    /// (order key, offset in the staging file, entry), in arrival order.
    entries: Vec<(u64, u64, HeaderEntry)>,
    staged_bytes: u64,
    committed: bool,
    /// OUT did not exist before: on failure it is removed again (if still empty).
    created_out: bool,
}

impl AdapterWriter {
    /// Prepares OUT. Refuses to replace an existing adapter unless `overwrite`.
    pub fn create(out: &Path, overwrite: bool) -> Result<AdapterWriter> {
        if out.exists() && !out.is_dir() {
            return Err(Error::checkpoint(
                out,
                "the output path exists and is not a folder",
            ));
        }
        if !overwrite {
            for f in [CONFIG_FILE, MODEL_FILE] {
                if out.join(f).exists() {
                    return Err(Error::checkpoint(
                        out,
                        format!("already holds {f}; pass --force to replace the adapter"),
                    ));
                }
            }
        }
        let created_out = !out.exists();
        std::fs::create_dir_all(out)
            .map_err(|e| Error::io(out, "cannot create output folder", e))?;
        let staging = out.join(format!(".phlora-staging-{}", std::process::id()));
        if staging.exists() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        std::fs::create_dir(&staging).map_err(|e| {
            Error::io(
                &staging,
                "cannot create staging folder (is the output folder writable?)",
                e,
            )
        })?;
        let data_path = staging.join("tensors.partial");
        let data =
            File::create(&data_path).map_err(|e| Error::io(&data_path, "cannot create", e))?;
        Ok(AdapterWriter {
            out: out.to_path_buf(),
            staging,
            data_path,
            data: Some(BufWriter::with_capacity(1 << 20, data)),
            entries: Vec::new(),
            staged_bytes: 0,
            committed: false,
            created_out,
        })
    }

    /// Stages one tensor; `order` is its place in the final file (ties keep arrival order).
    pub fn add(
        &mut self,
        order: u64,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        let data = self.data.as_mut().expect("not committed");
        data.write_all(bytes)
            .map_err(|e| Error::io(&self.data_path, "cannot write", e))?;
        self.entries.push((
            order,
            self.staged_bytes,
            HeaderEntry {
                name,
                dtype,
                shape,
                nbytes: bytes.len(),
            },
        ));
        self.staged_bytes += bytes.len() as u64;
        Ok(())
    }

    pub fn num_tensors(&self) -> usize {
        self.entries.len()
    }

    /// Writes the final files and moves them into OUT; the config goes last.
    pub fn commit(mut self, config_json: &str, report_json: &str) -> Result<()> {
        let data = self.data.take().expect("not committed");
        let data = data
            .into_inner()
            .map_err(|e| Error::io(&self.data_path, "cannot write", e.into_error()))?;
        drop(data);

        let model_tmp = self.staging.join(MODEL_FILE);
        // A stable sort: equal keys keep the order they were added in.
        self.entries.sort_by_key(|e| e.0);
        let entries: Vec<HeaderEntry> = self.entries.iter().map(|e| e.2.clone()).collect();
        {
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            let mut f = BufWriter::with_capacity(
                1 << 20,
                File::create(&model_tmp).map_err(|e| Error::io(&model_tmp, "cannot create", e))?,
            );
            f.write_all(&header_bytes(&entries, &meta))
                .map_err(|e| Error::io(&model_tmp, "cannot write", e))?;
            let mut src = File::open(&self.data_path)
                .map_err(|e| Error::io(&self.data_path, "cannot open", e))?;
            for (_, offset, entry) in &self.entries {
                src.seek(SeekFrom::Start(*offset))
                    .map_err(|e| Error::io(&self.data_path, "cannot read back", e))?;
                let copied = std::io::copy(&mut (&mut src).take(entry.nbytes as u64), &mut f)
                    .map_err(|e| Error::io(&model_tmp, "cannot write", e))?;
                if copied != entry.nbytes as u64 {
                    return Err(Error::checkpoint(
                        &self.data_path,
                        format!("staged data for {} is truncated", entry.name),
                    ));
                }
            }
            let f = f
                .into_inner()
                .map_err(|e| Error::io(&model_tmp, "cannot write", e.into_error()))?;
            f.sync_all()
                .map_err(|e| Error::io(&model_tmp, "cannot sync", e))?;
        }
        let _ = std::fs::remove_file(&self.data_path);
        let config_tmp = self.staging.join(CONFIG_FILE);
        write_synced(&config_tmp, config_json.as_bytes())?;
        let report_tmp = self.staging.join(REPORT_FILE);
        write_synced(&report_tmp, report_json.as_bytes())?;

        // An older adapter's config must not pair with the new model file, even briefly.
        let final_config = self.out.join(CONFIG_FILE);
        if final_config.exists() {
            std::fs::remove_file(&final_config)
                .map_err(|e| Error::io(&final_config, "cannot replace", e))?;
        }
        for (tmp, name) in [
            (&model_tmp, MODEL_FILE),
            (&report_tmp, REPORT_FILE),
            (&config_tmp, CONFIG_FILE),
        ] {
            let dst = self.out.join(name);
            std::fs::rename(tmp, &dst).map_err(|e| Error::io(&dst, "cannot move into place", e))?;
        }
        if let Ok(dir) = File::open(&self.out) {
            let _ = dir.sync_all();
        }
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.staging);
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, "cannot create", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(path, "cannot write", e))?;
    f.sync_all().map_err(|e| Error::io(path, "cannot sync", e))
}

impl Drop for AdapterWriter {
    fn drop(&mut self) {
        if !self.committed {
            self.data.take();
            let _ = std::fs::remove_dir_all(&self.staging);
            if self.created_out {
                let _ = std::fs::remove_dir(&self.out);
            }
        }
    }
}
