//! Anthropic's Messages API: requests in, events and messages out.
