//! `groupIPM`: the request's user belongs to a group of a user DB.

use std::sync::Arc;

use super::user_db::UserDb;

pub struct GroupIpm {
    pub group: String,
    pub user_db: Arc<UserDb>,
}

impl GroupIpm {
    pub fn matches(&self, user: Option<&str>) -> bool {
        user.is_some_and(|u| self.user_db.groups(u).contains(&self.group))
    }
}
