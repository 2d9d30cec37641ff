//! The DN's lease journal: one line per lease of its own pool, appended and synced before the
//! client hears of the lease, so that a restarted DN knows which addresses are still taken.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use holdfast_proto::dn::LeaseRecord;

pub struct Journal {
    path: PathBuf,
    file: File,
    /// Lines written since the file was last rewritten.
    appended: usize,
}

impl Journal {
    /// Opens (creating it and its directory if needed) the journal at `path`; returns it with
    /// the records it holds, oldest first, and how many lines could not be read.
    pub fn open(path: &Path) -> Result<(Self, Vec<LeaseRecord>, usize)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "cannot create the lease journal's directory {}",
                    dir.display()
                )
            })?;
        }
        let mut records = Vec::new();
        let mut unreadable = 0;
        let mut torn = false;
        match File::open(path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut line = String::new();
                while reader
                    .read_line(&mut line)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    > 0
                {
                    torn = !line.ends_with('\n');
                    if !line.trim().is_empty() {
                        match LeaseRecord::from_line(&line) {
                            Some(r) => records.push(r),
                            // A torn last write, or a hand edit: the rest is still good.
                            None => unreadable += 1,
                        }
                    }
                    line.clear();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
        let mut journal = Self {
            file: Self::append_to(path)?,
            path: path.to_owned(),
            appended: records.len() + unreadable,
        };
        if torn {
            // The next record starts on a line of its own.
            journal
                .file
                .write_all(b"\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok((journal, records, unreadable))
    }

    fn append_to(path: &Path) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the lease journal {}", path.display()))
    }

    /// Appends one lease and waits until it is on disk.
    pub fn append(&mut self, record: &LeaseRecord) -> Result<()> {
        let line = record.to_line() + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot write the lease journal {}", self.path.display()))?;
        self.appended += 1;
        Ok(())
    }

    /// Whether the file holds so many superseded lines that it should be rewritten.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.appended > 1024.max(4 * live)
    }

    /// Replaces the file with exactly `records`, atomically.
    pub fn compact(&mut self, records: &[LeaseRecord]) -> Result<()> {
        let tmp = self.path.with_extension("leases.tmp");
        let mut text = String::new();
        for r in records {
            text += &r.to_line();
            text.push('\n');
        }
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write()
            .with_context(|| format!("cannot rewrite the lease journal {}", self.path.display()))?;
        self.file = Self::append_to(&self.path)?;
        self.appended = records.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(identity: &str, last: u8, expires_at: u64) -> LeaseRecord {
        LeaseRecord {
            identity: identity.into(),
            address: std::net::IpAddr::from([10, 200, 0, last]),
            expires_at,
            address6: None,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_line_is_skipped() {
        let dir = std::env::temp_dir().join(format!("holdfast-journal-{}", std::process::id()));
        let path = dir.join("sub").join("dn1.leases");
        let _ = std::fs::remove_dir_all(&dir);
        let (mut j, none, bad) = Journal::open(&path).unwrap();
        assert!(none.is_empty() && bad == 0);
        j.append(&record("laptop", 2, 100)).unwrap();
        j.append(&record("a name with spaces\nand a newline", 3, 200))
            .unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"123 10.200.0").unwrap();
        drop(f);
        let (mut j, back, bad) = Journal::open(&path).unwrap();
        assert_eq!(
            back,
            vec![
                record("laptop", 2, 100),
                record("a name with spaces\nand a newline", 3, 200)
            ]
        );
        assert_eq!(bad, 1);
        // What follows a torn line is read whole; a dual-stack lease keeps its IPv6 address.
        let dual = LeaseRecord {
            address6: Some("fd00:200::5".parse().unwrap()),
            ..record("tablet", 5, 400)
        };
        j.append(&dual).unwrap();
        let (mut j, back, _) = Journal::open(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], dual);
        j.compact(&back[1..2]).unwrap();
        j.append(&record("phone", 4, 300)).unwrap();
        let (_, after, bad) = Journal::open(&path).unwrap();
        assert_eq!(after, vec![back[1].clone(), record("phone", 4, 300)]);
        assert_eq!(bad, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
