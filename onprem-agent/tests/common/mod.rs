//! Builders shared by the agent's integration tests.
#![allow(dead_code)]

use relay::proto::{sealed_operation::Action, ChangePassword, ResetPassword};

pub fn reset(p: &str) -> Action {
    Action::Reset(ResetPassword {
        new_password: p.into(),
        ..Default::default()
    })
}

pub fn change(old: &str, new: &str) -> Action {
    Action::Change(ChangePassword {
        old_password: old.into(),
        new_password: new.into(),
    })
}
