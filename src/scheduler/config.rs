//! `scheduler_config.json`, read the way diffusers' `from_config` reads it: a key present
//! in the file wins, otherwise the scheduler class's own default applies.

use serde_json::{Map, Value};

use crate::error::{Error, Result, bad_file, invalid};

#[derive(Clone, Debug, Default)]
pub struct SchedulerConfig {
    values: Map<String, Value>,
}

impl SchedulerConfig {
    pub fn from_json(text: &str) -> Result<SchedulerConfig> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(values)) => Ok(SchedulerConfig { values }),
            Ok(_) => invalid("scheduler_config.json is not a JSON object"),
            Err(e) => Err(bad_file("scheduler_config.json", e)),
        }
    }

    /// A config with some keys set, for tests and overrides.
    pub fn with(mut self, key: &str, value: Value) -> SchedulerConfig {
        self.values.insert(key.to_string(), value);
        self
    }

    /// The `_class_name` the file names.
    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::Invalid(format!("scheduler config `{key}` is not a number: {v}"))
            }),
        }
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::Invalid(format!("scheduler config `{key}` is not a count: {v}"))
            }),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::Invalid(format!("scheduler config `{key}` is not a boolean: {v}"))
            }),
        }
    }

    pub fn string(&self, key: &str, default: &str) -> String {
        self.present(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    }

    /// `trained_betas`, if the file gives them.
    pub fn floats(&self, key: &str) -> Option<Vec<f64>> {
        self.present(key)?
            .as_array()?
            .iter()
            .map(Value::as_f64)
            .collect()
    }
}
