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
use crate::staging::StagedOutput;

pub struct AdapterWriter {
    // Fields drop in this order: the data file closes before `staged` removes its folder.
    data: Option<BufWriter<File>>,
    /// Dropped uncommitted, it removes the staging folder.
    staged: StagedOutput,
    staging: PathBuf,
    data_path: PathBuf,
    /// (order key, offset in the staging file, entry, rank axis), in arrival order.
    entries: Vec<(u64, u64, HeaderEntry, Option<usize>)>,
    staged_bytes: u64,
}

impl AdapterWriter {
    /// Prepares OUT. Refuses to replace an existing adapter unless `overwrite`.
    pub fn create(out: &Path, overwrite: bool) -> Result<AdapterWriter> {
        let staged = StagedOutput::create(
            out,
            "staging",
            &[CONFIG_FILE, MODEL_FILE],
            "the adapter",
            overwrite,
        )?;
        let staging = staged.dir().to_path_buf();
        let data_path = staging.join("tensors.partial");
        let data =
            File::create(&data_path).map_err(|e| Error::io(&data_path, "cannot create", e))?;
        Ok(AdapterWriter {
            staged,
            staging,
            data_path,
            data: Some(BufWriter::with_capacity(1 << 20, data)),
            entries: Vec::new(),
            staged_bytes: 0,
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
        self.add_factor(order, name, dtype, shape, bytes, None)
    }

    /// [`add`](Self::add) for a LoRA factor whose rank runs along `rank_axis` (0 for A
    /// [r, in], 1 for B [out, r]): [`commit`](Self::commit) can zero-pad it to a larger rank.
    pub fn add_factor(
        &mut self,
        order: u64,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: &[u8],
        rank_axis: Option<usize>,
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
            rank_axis,
        ));
        self.staged_bytes += bytes.len() as u64;
        Ok(())
    }

    pub fn num_tensors(&self) -> usize {
        self.entries.len()
    }

    /// Leaves a staged tensor out of the file (its bytes stay in staging, never copied).
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.2.name != name);
        self.entries.len() != before
    }

    /// Writes the final files and moves them into OUT; the config goes last. `pad_to(name)`
    /// gives the rank a factor is zero-padded to along its rank axis (B·A is unchanged).
    pub fn commit(
        mut self,
        config_json: &str,
        report_json: &str,
        pad_to: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<()> {
        let data = self.data.take().expect("not committed");
        let data = data
            .into_inner()
            .map_err(|e| Error::io(&self.data_path, "cannot write", e.into_error()))?;
        drop(data);

        let model_tmp = self.staging.join(MODEL_FILE);
        // A stable sort: equal keys keep the order they were added in.
        self.entries.sort_by_key(|e| e.0);
        let padded = |e: &HeaderEntry, axis: Option<usize>| -> HeaderEntry {
            let mut e = e.clone();
            if let (Some(axis), Some(r)) = (axis, pad_to(&e.name)) {
                let old = e.shape[axis];
                if r > old {
                    e.nbytes = e.nbytes / old.max(1) * r;
                    e.shape[axis] = r;
                }
            }
            e
        };
        let entries: Vec<HeaderEntry> = self.entries.iter().map(|e| padded(&e.2, e.3)).collect();
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
            for ((_, offset, entry, axis), out) in self.entries.iter().zip(&entries) {
                src.seek(SeekFrom::Start(*offset))
                    .map_err(|e| Error::io(&self.data_path, "cannot read back", e))?;
                let mut bytes = vec![0u8; entry.nbytes];
                src.read_exact(&mut bytes)
                    .map_err(|e| Error::io(&self.data_path, "staged data is truncated", e))?;
                if out.nbytes != entry.nbytes {
                    bytes = pad_rank(
                        &bytes,
                        &entry.shape,
                        axis.expect("only factors grow"),
                        &out.shape,
                    );
                }
                f.write_all(&bytes)
                    .map_err(|e| Error::io(&model_tmp, "cannot write", e))?;
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

        // The config goes last, and an older adapter's config first: it must not pair with the
        // new model file, even briefly.
        let names = [MODEL_FILE, REPORT_FILE, CONFIG_FILE].map(PathBuf::from);
        self.staged.commit(&names, &[PathBuf::from(CONFIG_FILE)])?;
        Ok(())
    }
}

/// A row-major 2-D tensor zero-padded from `shape` to `to` along `axis`.
fn pad_rank(bytes: &[u8], shape: &[usize], axis: usize, to: &[usize]) -> Vec<u8> {
    let elem = bytes.len() / (shape[0] * shape[1]).max(1);
    let mut out = vec![0u8; to[0] * to[1] * elem];
    if axis == 0 {
        out[..bytes.len()].copy_from_slice(bytes);
    } else {
        let (row_in, row_out) = (shape[1] * elem, to[1] * elem);
        for (i, row) in bytes.chunks(row_in).enumerate() {
            out[i * row_out..i * row_out + row_in].copy_from_slice(row);
        }
    }
    out
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, "cannot create", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(path, "cannot write", e))?;
    f.sync_all().map_err(|e| Error::io(path, "cannot sync", e))
}
