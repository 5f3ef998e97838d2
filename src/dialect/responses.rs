//! OpenAI's Responses API: requests in, events and response objects out.
